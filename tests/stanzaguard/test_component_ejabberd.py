"""Component mode with ejabberd: ``mod_service_log`` copies stanzas to `stanzaguard component`.

The configuration of docs/integrations/ejabberd.md#component-mode: an ``ejabberd_service``
listener on loopback for ``archive.localhost`` and ``mod_service_log`` with that component as
its logger. ejabberd then wraps every stanza a local user sends *and* every stanza delivered to
one in ``<message from='localhost'><forwarded/></message>``, so a local chat message reaches the
component twice (sent and received copy) along with presence and iq stanzas; the archive must
still hold each message once. Clients talk to ejabberd directly here: component mode needs no
inline proxy.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from archive_api.store.records import ArchiveRecord, Direction, ObservationVia
from classifier.verdict import Action
from stanzaguard.component_service import ComponentService
from stanzaguard.settings import load_settings
from tests.stanzaguard.conftest import receive
from tests.support.clients import ChatClient
from tests.support.ejabberd import EjabberdConfig, EjabberdServer, make_ejabberd

pytestmark = pytest.mark.integration

COMPONENT = "archive.localhost"
SECRET = "ejabberd-component-secret"
TIMEOUT = 15.0


@pytest.fixture(scope="module")
def ejabberd(request: pytest.FixtureRequest) -> Iterator[EjabberdServer]:
    """This module's ejabberd: the component declared and ``mod_service_log`` feeding it."""
    failures_before = request.session.testsfailed
    server = make_ejabberd(
        EjabberdConfig(components={COMPONENT: SECRET}, service_log_to=(COMPONENT,))
    )
    try:
        yield server
    finally:
        if request.session.testsfailed > failures_before:
            print(f"\n=== ejabberd {server.directory} ===\n{server.diagnostics()}")
        server.cleanup()


@pytest.fixture
async def component(ejabberd: EjabberdServer, tmp_path: Path) -> AsyncIterator[ComponentService]:
    settings = load_settings(
        domain=[ejabberd.domain],
        component_jid=COMPONENT,
        component_secret=SECRET,
        component_server=f"{ejabberd.host}:{ejabberd.component_port}",
        data_dir=tmp_path / "component",
        model="off",
        index_worker=False,
    )
    service = ComponentService(settings)
    await service.start()
    try:
        assert service.link is not None
        await asyncio.wait_for(service.link.connected.wait(), TIMEOUT)
        yield service
    finally:
        await service.stop()


async def chat_records(service: ComponentService, count: int) -> list[ArchiveRecord]:
    """Poll until the component has indexed ``count`` chat records; then what it has."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while True:
        assert service.link is not None
        await service.link.idle()
        await service.indexer.drain()
        page = await service.store.search("type:chat", limit=1000)
        found = [hit.record for hit in page.hits]
        if len(found) >= count or loop.time() > deadline:
            return found
        await asyncio.sleep(0.05)


async def test_mod_service_log_copies_are_archived_once(
    ejabberd: EjabberdServer, component: ComponentService
) -> None:
    users = ejabberd.register_fresh("alice", "bob")
    clients = [
        ChatClient(ejabberd.jid(users[role]), ejabberd.users[users[role]], port=ejabberd.c2s_port)
        for role in ("alice", "bob")
    ]
    alice, bob = clients
    try:
        await alice.connect()
        await bob.connect()
        alice.send_chat(bob.jid, "hello bob, lunch?", id="ej-1")
        await receive(bob, "hello bob, lunch?")
        bob.send_chat(ejabberd.jid(users["alice"]), "yes alice, at noon", id="ej-2")
        await receive(alice, "yes alice, at noon")

        await chat_records(component, 2)
        await asyncio.sleep(0.3)  # the second (delivered) copy of each would land by now
        found = await chat_records(component, 2)
    finally:
        for client in clients:
            await client.disconnect()

    by_id = {record.message_id or "": record for record in found}
    assert sorted(by_id) == ["ej-1", "ej-2"] and len(found) == 2, [r.body for r in found]
    first, second = by_id["ej-1"], by_id["ej-2"]
    assert (first.sender, first.recipient, first.body) == (
        ejabberd.jid(users["alice"]),
        ejabberd.jid(users["bob"]),
        "hello bob, lunch?",
    )
    assert (second.sender, second.recipient) == (
        ejabberd.jid(users["bob"]),
        ejabberd.jid(users["alice"]),
    )
    for record in found:
        assert record.verdict.action is Action.ALLOW
        assert record.direction is Direction.COPY
        assert {o.via for o in record.observations} == {ObservationVia.COMPONENT}
