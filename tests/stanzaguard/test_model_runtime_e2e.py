"""The text model on the hot path, end to end: the real proxy in front of a real Prosody.

``localhost`` users connect through the archiving service; ``remote.localhost`` stands for
the federated network (its users connect to Prosody directly, so their messages reach local
users on the proxy's server→client leg, inbound, where the model scores them). Eve there is
a stranger to bob. The service runs with the shipped model (the `model` setting's default);
versions are swapped in with the real `stanzaguard model` command in another process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from archive_api.store.records import ArchiveRecord, RecordStatus
from classifier.train import TrainConfig, fit_model
from classifier.verdict import Action, Reason
from stanzaguard.clock import SystemClock
from stanzaguard.errors import SettingsError
from stanzaguard.models import load_default_model
from stanzaguard.registry import ModelRegistry
from tests.conftest import ProsodyFactory
from tests.stanzaguard.conftest import ArchivingFactory, ArchivingProxy, remote_clients, run_cli
from tests.support.clients import ChatClient
from tests.support.prosody import ProsodyConfig, ProsodyServer
from tests.support.textdata import synthetic_corpus

REMOTE = "remote.localhost"
REMOTE_USERS = {"eve": "eve-secret"}
EVE = f"eve@{REMOTE}"
TIMEOUT = 10.0
SPAM = (
    "WINNER!! As a valued network customer you have been selected to receive a £900 prize "
    "reward! To claim call 09061701461. Claim code KL341. Valid 12 hours only."
)
NORMAL = "Are we still on for lunch tomorrow? I can book the place near the office."
# Ham to the shipped model (p about 0.04), spam to one trained on the synthetic corpus.
PROBE = "claim your guaranteed bonus prize"
POLICY = """
version = 1

[model]
flag_at = 0.5
quarantine_at = 0.95
strangers_quarantine_at = 0.8
"""

pytestmark = pytest.mark.integration


@pytest.fixture
def prosody(prosody_factory: ProsodyFactory) -> ProsodyServer:
    server = prosody_factory(ProsodyConfig(extra_config=f'VirtualHost "{REMOTE}"'))
    for user, password in REMOTE_USERS.items():
        server.register_on_host(REMOTE, user, password)
    return server


@pytest.fixture
async def eve(prosody: ProsodyServer) -> AsyncIterator[ChatClient]:
    async with remote_clients(prosody, REMOTE, REMOTE_USERS) as connect:
        yield await connect("eve")


@pytest.fixture
async def running(archiving_factory: ArchivingFactory) -> ArchivingProxy:
    # model="default" is what the setting defaults to; the fixture turns it off unless asked.
    return await archiving_factory(policy=POLICY, model="default")


async def login(running: ArchivingProxy, user: str) -> ChatClient:
    client = running.client(user, resource="desk")
    await client.connect()
    await client.xmpp.get_roster()  # the proxy learns bob's roster: eve is not in it
    return client


async def eventually(
    check: Callable[[], Awaitable[object]], what: str, timeout: float = TIMEOUT
) -> object:
    """Poll ``check`` until it returns something truthy (a wait, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def nth_record(running: ArchivingProxy, body: str, n: int) -> ArchiveRecord:
    """The ``n``-th (1-based) archived message from eve with ``body``, once it is there."""

    async def find() -> ArchiveRecord | None:
        await running.drain()
        page = await running.store.search(f"from:{EVE} type:chat", limit=100, sort="time_asc")
        found = [hit.record for hit in page.hits if hit.record.body == body]
        return found[n - 1] if len(found) >= n else None

    record = await eventually(find, f"record {n} of eve's {body!r}")
    assert isinstance(record, ArchiveRecord)
    return record


MODEL_REASON = re.compile(r"spam probability (?P<p>[0-9.]+)(?P<rest>.*) \(model (?P<model>\S+)\)")


def model_reason(record: ArchiveRecord) -> tuple[Reason, float, str]:
    (reason,) = [r for r in record.verdict.reasons if r.rule_id == "text-model"]
    match = MODEL_REASON.fullmatch(reason.detail)
    assert match is not None, reason.detail
    return reason, float(match["p"]), match["model"]


async def test_a_strangers_spam_is_held_and_normal_chat_delivered(
    running: ArchivingProxy, eve: ChatClient
) -> None:
    bob = await login(running, "bob")
    model = load_default_model()
    expected_spam, expected_normal = model.score(SPAM), model.score(NORMAL)
    assert expected_spam >= 0.8 > 0.5 > expected_normal  # the thresholds of POLICY

    eve.send_chat("bob@localhost", SPAM)
    eve.send_chat("bob@localhost", NORMAL)
    got = await bob.next_message(TIMEOUT, where=lambda m: m.body == NORMAL)
    assert got.from_.split("/")[0] == EVE

    held = await nth_record(running, SPAM, 1)
    assert (held.status, held.verdict.action) == (RecordStatus.HELD, Action.QUARANTINE)
    reason, probability, name = model_reason(held)
    assert name == "default" and reason.action is Action.QUARANTINE
    assert probability == pytest.approx(expected_spam, abs=5e-4)
    assert reason.detail.startswith(
        f"spam probability {expected_spam:.3f} reached the quarantine threshold 0.8 for a stranger"
    )
    assert reason.contribution == pytest.approx(expected_spam)

    delivered = await nth_record(running, NORMAL, 1)
    assert (delivered.status, delivered.verdict.action) == (RecordStatus.DELIVERED, Action.ALLOW)
    reason, probability, name = model_reason(delivered)
    assert (reason.action, name) == (Action.ALLOW, "default")
    assert probability == pytest.approx(expected_normal, abs=5e-4)
    assert not any(m.body == SPAM for m in await bob.drain())


def write_registry(registry: ModelRegistry, text: str) -> None:
    """Replace registry.json the way an editor would (a new file renamed over it)."""
    tmp = registry.registry_file.with_name("edited.tmp")
    tmp.write_text(text)
    tmp.replace(registry.registry_file)


async def test_versions_swap_in_and_out_of_the_running_service(
    running: ArchivingProxy, eve: ChatClient, caplog: pytest.LogCaptureFixture
) -> None:
    bob = await login(running, "bob")
    registry = ModelRegistry.of(running.data_dir, SystemClock())
    retrained = fit_model(synthetic_corpus(), TrainConfig(inner_folds=3)).model
    assert registry.add_version(retrained) == "v0001"
    assert registry.add_version(retrained) == "v0002"
    d = str(running.data_dir)
    sent = 0

    async def probe() -> ArchiveRecord:
        nonlocal sent
        eve.send_chat("bob@localhost", PROBE)
        sent += 1
        return await nth_record(running, PROBE, sent)

    before = await probe()
    _, p_before, name = model_reason(before)
    assert (name, before.status) == ("default", RecordStatus.DELIVERED)
    await bob.next_message(TIMEOUT, where=lambda m: m.body == PROBE)

    done = await asyncio.to_thread(
        run_cli, "model", "activate", "v0001", "--actor", "olivia", "--data-dir", d, "--wait", "10"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the running service uses v0001" in done.stdout
    after = await probe()
    reason, p_after, name = model_reason(after)
    assert name == "v0001"
    assert p_after == pytest.approx(retrained.score(PROBE), abs=5e-4)
    assert p_after - p_before > 0.5
    assert (after.status, reason.action) == (RecordStatus.HELD, Action.QUARANTINE)

    # A damaged registry file: logged, the model in force stays.
    good = registry.registry_file.read_text()
    with caplog.at_level(logging.ERROR, "stanzaguard.model_runtime"):
        write_registry(registry, '{"format": "stanzaguard-model-registry", "version": 1, "acti')

        async def reported() -> bool:
            serving = registry.read_serving()
            return serving is not None and serving.error is not None

        await eventually(reported, "the service reported the damaged registry")
    assert "the model registry could not be loaded" in caplog.text
    assert model_reason(await probe())[2] == "v0001"

    # A version whose arrays are damaged: logged, the model in force stays.
    (running.data_dir / "models" / "v0002" / "model.npz").write_bytes(b"PK\x03\x04junk")
    broken = json.loads(good)
    broken["active"] = "v0002"
    caplog.clear()
    with caplog.at_level(logging.ERROR, "stanzaguard.model_runtime"):
        write_registry(registry, json.dumps(broken))

        async def refused() -> bool:
            serving = registry.read_serving()
            return serving is not None and (serving.error or {}).get("version") == "v0002"

        await eventually(refused, "the service reported the damaged version")
    assert "model version v0002 could not be loaded; the model in force stays" in caplog.text
    assert model_reason(await probe())[2] == "v0001"

    # The operator restores the file; rolling back returns to the shipped model.
    write_registry(registry, good)
    done = await asyncio.to_thread(
        run_cli, "model", "rollback", "--actor", "oscar", "--data-dir", d, "--wait", "10"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the running service uses default" in done.stdout
    last = await probe()
    assert model_reason(last)[2] == "default"
    assert last.status is RecordStatus.DELIVERED
    listing = await asyncio.to_thread(run_cli, "model", "list", "--data-dir", d, "--json")
    rows = [json.loads(line) for line in listing.stdout.splitlines()]
    assert [(r["version"], r["active"], r["serving"]) for r in rows] == [
        ("v0001", False, False),
        ("v0002", False, False),
    ]


async def test_a_model_that_does_not_load_stops_start_up(
    archiving_factory: ArchivingFactory, tmp_path: Path
) -> None:
    with pytest.raises(SettingsError, match=r"model: .*no such file"):
        await archiving_factory(model=str(tmp_path / "no-model-here"))
