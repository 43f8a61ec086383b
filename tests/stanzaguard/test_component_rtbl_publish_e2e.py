# mypy: disallow-untyped-calls=False
# (slixmpp's pubsub plugin API is untyped; the subscriber below drives it directly.)
"""Component mode learns from spam reports and publishes the block list, as `stanzaguard run`.

Component mode cannot block in-line: the list it publishes is how what it learns takes effect.
One real Prosody: ``localhost`` forwards copies to the component ``archive.localhost``
(mod_firewall, the script of docs/integrations/component.md); ``remote.localhost`` stands for
the federated network (the test Prosody has no s2s; the policy lists only ``localhost`` as
local); ``pubsub.localhost`` hosts the nodes StanzaGuard publishes as ``rtbladmin``. Every
client talks to Prosody directly: nothing of StanzaGuard is in their path.

Alice reports Eve's spam to the component (XEP-0377); the component records the report,
learning makes it an example, the listing rule (auto review, one reporter's weight lists a
JID) lists Eve, and the publisher puts her SHA-256 on the nodes. A Prosody account that is
not StanzaGuard's reads the node, and the API (run beside, on the same data directory, as
`stanzaguard api` would be) serves the HTTP list. Waits poll; no timing assertions.
"""

from __future__ import annotations

import asyncio
import hashlib
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from slixmpp.exceptions import IqError

from stanzaguard.api_wiring import start_api
from stanzaguard.clock import SystemClock
from stanzaguard.component_service import ComponentService
from stanzaguard.errors import SettingsError
from stanzaguard.settings import Settings, load_settings
from tests.conftest import ClientFactory, ProsodyFactory
from tests.stanzaguard.conftest import receive, remote_clients
from tests.stanzaguard.test_component_e2e import COMPONENT, SECRET, firewall_script
from tests.support.clients import ChatClient, TlsMode
from tests.support.prosody import ProsodyConfig, ProsodyServer
from tests.support.rtbl import JIDS_NODE, REMOTE, RTBL_ADMIN, RTBL_USER, RTBL_USERS, jid_sha256
from tests.support.services import free_port

pytestmark = pytest.mark.integration

TIMEOUT = 15.0
REMOTE_USERS = {"eve": "eve-secret", "frank": "frank-secret"}
EVE = f"eve@{REMOTE}"
FRANK = f"frank@{REMOTE}"
SPAM = "Cheap watches! Reply now to claim yours"
POLICY = """\
version = 1
local_domains = ["localhost"]
"""
PUBLISHING: dict[str, Any] = {
    "blocklist_learning": True,
    "blocklist_review": "auto",
    # One local reporter (weight 1.0 until an officer contradicts them) lists a JID.
    "blocklist_jid_report_weight": 1.0,
    "blocklist_http": "public",
    "environment": "development",
    "model": "off",
    "index_worker": False,
}


def home_firewall_script() -> str:
    """The documented script, with the organisation's zone narrowed to ``localhost``.

    In the documented script ``$local`` is every host of the server. Here ``remote.localhost``
    is a host of the same Prosody, so a message from it would never be "entering" ``$local``;
    a zone of ``localhost`` alone treats it as the federated sender it stands for. The firewall
    is off on ``remote.localhost`` itself, as it would be on someone else's server.
    """
    script = firewall_script(COMPONENT).replace("ENTERING: $local", "ENTERING: home")
    assert "ENTERING: home" in script
    return f"%ZONE home: localhost\n\n{script}"


@pytest.fixture
def prosody(prosody_factory: ProsodyFactory) -> ProsodyServer:
    """Forwards copies to the component; hosts the pubsub service and a "remote" host."""
    config = ProsodyConfig(
        components={COMPONENT: SECRET},
        firewall_script=home_firewall_script(),
        # mod_pubsub makes server admins node owners; only owners may create nodes.
        extra_global=f'admins = {{ "{RTBL_ADMIN}@localhost" }}',
        extra_config=f'VirtualHost "{REMOTE}"\n    modules_disabled = {{ "firewall" }}',
    )
    server = prosody_factory(config, users=RTBL_USERS)
    for user, password in REMOTE_USERS.items():
        server.register_on_host(REMOTE, user, password)
    return server


def component_settings(
    prosody: ProsodyServer, data_dir: Path, policy: Path, **overrides: Any
) -> Settings:
    return publishing_settings(
        data_dir,
        policy,
        component_server=f"{prosody.host}:{prosody.component_port}",
        rtbl_publish_service=prosody.pubsub_domain,
        rtbl_publish_jid=prosody.jid(RTBL_ADMIN),
        rtbl_publish_password=prosody.users[RTBL_ADMIN],
        rtbl_publish_server=f"{prosody.host}:{prosody.c2s_port}",
        **overrides,
    )


def publishing_settings(data_dir: Path, policy: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        **PUBLISHING,
        "domain": ["localhost"],
        "component_jid": COMPONENT,
        "component_secret": SECRET,
        "rtbl_publish_tls": "plain",
        **overrides,
    }
    return load_settings(data_dir=data_dir, policy=policy, **values)


@pytest.fixture
async def component(prosody: ProsodyServer, tmp_path: Path) -> AsyncIterator[ComponentService]:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    service = ComponentService(component_settings(prosody, tmp_path / "data", policy))
    try:
        await service.start()
        assert service.link is not None
        await asyncio.wait_for(service.link.connected.wait(), TIMEOUT)
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def remote(prosody: ProsodyServer) -> AsyncIterator[Callable[[str], Awaitable[ChatClient]]]:
    async with remote_clients(prosody, REMOTE, REMOTE_USERS) as connect:
        yield connect


async def eventually(
    probe: Callable[[], Awaitable[bool]], what: str, timeout: float = TIMEOUT
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await probe():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.1)


def report_about(jid: str) -> ET.Element:
    """A XEP-0191 block carrying a XEP-0377 spam report about `jid`."""
    return ET.fromstring(
        f"<block xmlns='urn:xmpp:blocking'><item jid='{jid}'>"
        "<report xmlns='urn:xmpp:reporting:1' reason='urn:xmpp:reporting:spam'>"
        "<text xml:lang='en'>unsolicited offer</text></report></item></block>"
    )


async def report(client: ChatClient, jid: str) -> Any:
    """Send a spam report about `jid` to the component; its answer (IqError on an error)."""
    iq: Any = client.xmpp.make_iq_set(ito=COMPONENT)
    iq.append(report_about(jid))
    return await iq.send(timeout=TIMEOUT)


async def node_items(subscriber: ChatClient, service: str, node: str) -> set[str]:
    """Item ids on a node of the real pubsub service (none while the node does not exist)."""
    try:
        answer = await subscriber.xmpp.plugin["xep_0060"].get_items(service, node, timeout=TIMEOUT)
    except IqError as exc:
        if exc.condition == "item-not-found":
            return set()
        raise
    return {item["id"] for item in answer["pubsub"]["items"]}


async def test_reports_to_the_component_are_learned_and_published(
    prosody: ProsodyServer,
    component: ComponentService,
    make_client: ClientFactory,
    remote: Callable[[str], Awaitable[ChatClient]],
    tmp_path: Path,
) -> None:
    publishing = component.rtbl_publishing
    assert publishing is not None and publishing.publisher is not None
    learning = component.learning
    assert learning is not None
    alice = make_client("alice", resource="laptop", tls=TlsMode.PLAIN)
    await alice.connect()
    subscriber = make_client(RTBL_USER, tls=TlsMode.PLAIN, plugins=("xep_0060",))
    await subscriber.connect()
    eve, frank = await remote("eve"), await remote("frank")

    # Eve spams Alice; the server forwards the copy to the component, which archives it.
    eve.send_chat(alice.bare_jid, SPAM)
    await receive(alice, SPAM)

    async def archived() -> bool:
        assert component.link is not None
        await component.link.idle()
        await component.indexer.drain()
        page = await component.store.search(f"from:{EVE}", limit=10)
        return any(hit.record.body == SPAM for hit in page.hits)

    await eventually(archived, "eve's message archived by the component")

    # Hostile and useless reports first: a remote user may not report here; a report about
    # a local user is recorded but never lists anyone of the organisation.
    with pytest.raises(IqError) as refused:
        await report(frank, EVE)
    assert refused.value.condition == "forbidden"
    answer = await report(alice, "bob@localhost")
    assert answer["type"] == "result"

    # Alice reports Eve: the same learning as `stanzaguard run` ...
    answer = await report(alice, EVE)
    assert answer["type"] == "result"

    async def learned() -> bool:
        await learning.flush()
        return any(e.sender == EVE for e in learning.examples.lines)

    await eventually(learned, "the report about eve recorded as an example")
    (example,) = [e for e in learning.examples.lines if e.sender == EVE]
    assert (example.actor, example.text) == ("alice@localhost", SPAM)

    # ... and the same publishing: her hash lands on the real pubsub node.
    eve_hash = jid_sha256(EVE)

    async def published() -> bool:
        # The nodes are published one after the other: wait for the MUC-ban node as well.
        assert publishing.publisher is not None
        bans = publishing.publisher.published.get("muc_bans_sha256", set())
        on_node = await node_items(subscriber, prosody.pubsub_domain, JIDS_NODE)
        return eve_hash in on_node and eve_hash in bans

    await eventually(published, "eve's SHA-256 on the pubsub nodes")
    items = await node_items(subscriber, prosody.pubsub_domain, JIDS_NODE)
    assert items == {eve_hash}, "only eve: not the reporter's own colleague, not frank"
    assert eve_hash in publishing.publisher.published.get("muc_bans_sha256", set())

    # The API on the same data directory (`stanzaguard api`) serves the same list over HTTP.
    api_port = free_port()
    api_settings = load_settings(data_dir=tmp_path / "data", domain=["localhost"], **PUBLISHING)
    api = await start_api(api_settings, SystemClock(), f"127.0.0.1:{api_port}")
    try:
        async with httpx.AsyncClient() as http:
            listed = await http.get(f"http://127.0.0.1:{api_port}/api/v1/rtbl/jids-sha256.txt")
        assert listed.status_code == 200
        assert listed.text == hashlib.sha256(EVE.encode()).hexdigest() + "\n"
    finally:
        await api.stop()


def test_publishing_without_learning_is_refused_before_anything_opens(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    data_dir = tmp_path / "data"
    publish = {
        "rtbl_publish_service": "pubsub.localhost",
        "rtbl_publish_jid": "rtbladmin@localhost",
        "rtbl_publish_password": "a-real-password",
    }
    unlearned = publishing_settings(data_dir, policy, **publish, blocklist_learning=False)
    with pytest.raises(SettingsError, match="blocklist_learning"):
        ComponentService(unlearned)
    weak = publishing_settings(
        data_dir,
        policy,
        **{**publish, "rtbl_publish_password": "changeme"},
        environment="production",
    )
    with pytest.raises(SettingsError, match="rtbl_publish_password"):
        ComponentService(weak)
    nameless = publishing_settings(
        data_dir, policy, **{**publish, "rtbl_publish_jid": "pubsub.localhost/admin"}
    )
    with pytest.raises(SettingsError, match="rtbl_publish_jid"):
        ComponentService(nameless)
    assert not data_dir.exists(), "nothing was opened or created"
