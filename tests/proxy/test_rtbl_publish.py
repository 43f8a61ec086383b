"""The RTBL publisher (proxy/rtbl_publish.py): pure request building, and against a real
Prosody pubsub service, read back by StanzaGuard's own subscriber (so the two agree)."""

from __future__ import annotations

import ssl
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator

import pytest

from classifier.blocklists import (
    MUC_BANS_NODE,
    SPAM_SOURCE_DOMAINS_NODE,
    SPAM_SOURCE_JIDS_NODE,
    BlockList,
    ListKind,
)
from proxy.rtbl import PUBSUB_NS, RtblConfig, RtblSubscriber, TlsMode, rtbl_nodes
from proxy.rtbl_publish import (
    PublishConfig,
    PublishError,
    RtblPublisher,
    create_request,
    publish_nodes,
    publish_request,
    retract_request,
)
from tests.conftest import ProsodyFactory
from tests.support.prosody import ProsodyServer
from tests.support.rtbl import (
    RTBL_ADMIN,
    RTBL_USER,
    RTBL_USERS,
    Publisher,
    eventually,
    jid_sha256,
    rtbl_prosody_config,
)

NODES = publish_nodes([SPAM_SOURCE_DOMAINS_NODE], [SPAM_SOURCE_JIDS_NODE, MUC_BANS_NODE])


# --- pure -------------------------------------------------------------------------------------


def test_default_node_names_keep_their_kinds() -> None:
    assert NODES == {
        "spam_source_domains": ListKind.DOMAINS,
        "spam_source_jids_sha256": ListKind.JID_SHA256,
        "muc_bans_sha256": ListKind.JID_SHA256,
    }


@pytest.mark.parametrize(
    ("domains", "jids", "problem"),
    [
        (["spam_source_jids_sha256"], [], "holds jid_sha256"),
        ([], ["spam_source_domains"], "holds domains"),
        (["mine"], ["mine"], "twice"),
        ([""], [], "invalid"),
        ([" padded"], [], "invalid"),
        (["x" * 500], [], "invalid"),
        ([], [], "no nodes"),
    ],
)
def test_bad_node_lists_are_refused(domains: list[str], jids: list[str], problem: str) -> None:
    with pytest.raises(PublishError, match=problem):
        publish_nodes(domains, jids)


def test_requests_carry_the_item_id_a_report_and_notify_on_retract() -> None:
    published = publish_request("spam_source_domains", "spam.example")
    item = published.find(f"{{{PUBSUB_NS}}}publish/{{{PUBSUB_NS}}}item")
    assert item is not None and item.get("id") == "spam.example"
    assert item.find("{urn:xmpp:reporting:1}report") is not None
    retracted = retract_request("spam_source_domains", "spam.example")
    retract = retracted.find(f"{{{PUBSUB_NS}}}retract")
    assert retract is not None and retract.get("notify") == "true"
    created = ET.tostring(create_request("n")).decode()
    assert "pubsub#max_items" in created and ">max<" in created


# --- against Prosody ---------------------------------------------------------------------------


@pytest.fixture
def prosody(prosody_factory: ProsodyFactory) -> ProsodyServer:
    return prosody_factory(rtbl_prosody_config(), users=RTBL_USERS)


class Wanted:
    """What the list says, as the store would (a version that grows with every change)."""

    def __init__(self) -> None:
        self.ids: dict[ListKind, frozenset[str]] = {
            ListKind.DOMAINS: frozenset(),
            ListKind.JID_SHA256: frozenset(),
        }
        self.version = 0

    def set(self, kind: ListKind, *ids: str) -> None:
        self.ids[kind] = frozenset(ids)
        self.version += 1

    async def of(self, kind: ListKind) -> frozenset[str]:
        return self.ids[kind]

    async def current_version(self) -> int:
        return self.version


def publish_config(prosody: ProsodyServer, **overrides: object) -> PublishConfig:
    values: dict[str, object] = {
        "jid": prosody.jid(RTBL_ADMIN),
        "password": prosody.users[RTBL_ADMIN],
        "service": prosody.pubsub_domain,
        "nodes": NODES,
        "host": prosody.host,
        "port": prosody.c2s_port,
        "tls": TlsMode.STARTTLS,
        "ssl_context": ssl.create_default_context(cafile=str(prosody.tls.ca)),
        "backoff_initial": 0.1,
        "backoff_max": 1.0,
        "poll_interval": 0.1,
        "request_timeout": 10.0,
        "connect_timeout": 10.0,
    }
    values.update(overrides)
    return PublishConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
async def subscriber(prosody: ProsodyServer) -> AsyncIterator[tuple[RtblSubscriber, BlockList]]:
    """StanzaGuard's own subscriber, reading what the publisher wrote."""
    service = prosody.pubsub_domain
    config = RtblConfig(
        jid=prosody.jid(RTBL_USER),
        password=prosody.users[RTBL_USER],
        nodes=rtbl_nodes([f"{service}/{name}" for name in NODES]),
        host=prosody.host,
        port=prosody.c2s_port,
        tls=TlsMode.STARTTLS,
        ssl_context=ssl.create_default_context(cafile=str(prosody.tls.ca)),
        backoff_initial=0.1,
        backoff_max=1.0,
        request_timeout=10.0,
        connect_timeout=10.0,
    )
    blocklist = BlockList()
    reader = RtblSubscriber(config, blocklist)
    yield reader, blocklist
    await reader.stop()


@pytest.mark.integration
async def test_publisher_creates_publishes_and_retracts_as_the_list_changes(
    prosody: ProsodyServer, subscriber: tuple[RtblSubscriber, BlockList]
) -> None:
    wanted = Wanted()
    wanted.set(ListKind.DOMAINS, "spam.example")
    wanted.set(ListKind.JID_SHA256, jid_sha256("bot@spam.example"))
    publisher = RtblPublisher(publish_config(prosody), wanted.of, wanted.current_version)
    await publisher.start()
    reader, blocklist = subscriber
    try:
        await eventually(publisher.in_sync.is_set, "the nodes hold the list")
        await reader.start()  # nodes exist now
        await eventually(reader.synced.is_set, "the subscriber fetched every node")
        assert blocklist.match_domain("spam.example") is not None
        assert blocklist.match_jid("bot@spam.example") is not None
        muc_bans = f"{prosody.pubsub_domain}/{MUC_BANS_NODE}"
        assert blocklist.entries("jid_sha256", source=muc_bans) == (jid_sha256("bot@spam.example"),)

        wanted.set(ListKind.DOMAINS, "other.example")  # one in, one out
        await eventually(
            lambda: blocklist.entries("domains") == ("other.example",),
            "a publish and a retraction reach the subscriber",
        )
        wanted.set(ListKind.JID_SHA256)
        publisher.notify()
        await eventually(
            lambda: blocklist.match_jid("bot@spam.example") is None, "the JID retracted"
        )
        assert publisher.published[SPAM_SOURCE_JIDS_NODE] == set()
        assert publisher.sessions == 1
    finally:
        await publisher.stop()
    assert "rtbladmin-secret" not in prosody.log_text()


@pytest.mark.integration
async def test_items_nobody_wanted_are_retracted_and_a_small_node_is_reconfigured(
    prosody: ProsodyServer,
) -> None:
    # Someone created the node with Prosody's defaults (20 items) and put an item there.
    operator = Publisher(prosody)
    await operator.connect()
    try:
        await operator.client.xmpp.plugin["xep_0060"].create_node(  # type: ignore[no-untyped-call]
            prosody.pubsub_domain, SPAM_SOURCE_DOMAINS_NODE, timeout=10
        )
        await operator.publish(SPAM_SOURCE_DOMAINS_NODE, "stale.example")
    finally:
        await operator.disconnect()
    wanted = Wanted()
    domains = [f"d{i:03}.example" for i in range(60)]  # more than Prosody's default 20
    wanted.set(ListKind.DOMAINS, *domains)
    config = publish_config(prosody, nodes=publish_nodes([SPAM_SOURCE_DOMAINS_NODE], []))
    publisher = RtblPublisher(config, wanted.of, wanted.current_version)
    await publisher.start()
    try:
        await eventually(publisher.in_sync.is_set, "the node holds the list", timeout=30)
    finally:
        await publisher.stop()
    # A fresh publisher fetches the node: every one of the 60 is there, the stale one not.
    again = RtblPublisher(config, wanted.of, wanted.current_version)
    await again.start()
    try:
        await eventually(again.in_sync.is_set, "fetched again", timeout=30)
        assert again.published[SPAM_SOURCE_DOMAINS_NODE] == set(domains)
    finally:
        await again.stop()


@pytest.mark.integration
async def test_pubsub_service_down_the_publisher_retries_and_catches_up(
    prosody: ProsodyServer, subscriber: tuple[RtblSubscriber, BlockList]
) -> None:
    wanted = Wanted()
    wanted.set(ListKind.DOMAINS, "first.example")
    publisher = RtblPublisher(publish_config(prosody), wanted.of, wanted.current_version)
    await publisher.start()
    try:
        await eventually(publisher.in_sync.is_set, "first list published")
        prosody.stop()
        await eventually(lambda: not publisher.connected, "the publisher noticed")
        # The list changes while the service is down: nothing is lost, it is in "the store".
        wanted.set(ListKind.DOMAINS, "second.example")
        await eventually(lambda: publisher.failures >= 1, "the session end counted")
        prosody.start()
        await eventually(
            lambda: publisher.sessions >= 2 and publisher.in_sync.is_set(),
            "reconnected and reconciled",
            timeout=30,
        )
        reader, blocklist = subscriber
        await reader.start()
        await eventually(reader.synced.is_set, "fetched")
        assert blocklist.entries("domains") == ("second.example",)
    finally:
        await publisher.stop()


@pytest.mark.integration
async def test_an_account_that_may_not_create_nodes_is_retried_not_fatal(
    prosody: ProsodyServer,
) -> None:
    wanted = Wanted()
    wanted.set(ListKind.DOMAINS, "spam.example")
    config = publish_config(prosody, jid=prosody.jid(RTBL_USER), password=prosody.users[RTBL_USER])
    publisher = RtblPublisher(config, wanted.of, wanted.current_version)
    await publisher.start()
    try:
        await eventually(lambda: publisher.failures >= 2, "refusals retried")
        assert not publisher.in_sync.is_set()
    finally:
        await publisher.stop()
