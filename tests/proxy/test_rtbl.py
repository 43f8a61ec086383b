"""The RTBL subscriber (proxy/rtbl.py) and block-list files (proxy/blocklist_files.py).

Unit tests of the parsing and applying, then the subscriber against pubsub nodes of a real
Prosody: initial items, live publishes, retractions, a purge, and reconnecting after the
server restarted. End to end through the proxy: tests/stanzaguard/test_rtbl_e2e.py.
"""

from __future__ import annotations

import base64
import logging
import os
import ssl
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from classifier.blocklists import BlockList, ListKind
from proxy.blocklist_files import (
    BlocklistFileError,
    BlocklistFileWatcher,
    ListFile,
    parse_list_file_spec,
    parse_list_file_specs,
)
from proxy.rtbl import (
    EVENT_NS,
    PUBSUB_NS,
    RSM_NS,
    NodeUpdate,
    RtblConfig,
    RtblError,
    RtblNode,
    RtblSubscriber,
    TlsMode,
    apply_items,
    apply_update,
    backoff_delay,
    install_sasl_redaction,
    parse_event,
    parse_items_page,
    parse_rtbl_node,
    rtbl_nodes,
)
from tests.conftest import ProsodyFactory
from tests.support.prosody import ProsodyServer
from tests.support.rtbl import (
    DOMAINS_NODE,
    JIDS_NODE,
    RTBL_USER,
    RTBL_USERS,
    Publisher,
    eventually,
    jid_sha256,
    rtbl_prosody_config,
)

DOMAINS = RtblNode("xmppbl.org", "spam_source_domains", ListKind.DOMAINS)
HASHES = RtblNode("xmppbl.org", "spam_source_jids_sha256", ListKind.JID_SHA256)

# --- node specs -------------------------------------------------------------------------------


def test_node_specs_know_the_xmppbl_and_mod_anti_spam_names() -> None:
    assert parse_rtbl_node("xmppbl.org/spam_source_domains") == DOMAINS
    assert parse_rtbl_node(" XMPPBL.org/spam_source_jids_sha256 ") == HASHES
    muc = parse_rtbl_node("xmppbl.org/muc_bans_sha256")
    assert (muc.kind, muc.source) == (ListKind.JID_SHA256, "xmppbl.org/muc_bans_sha256")
    custom = parse_rtbl_node("jid_sha256:pubsub.joinjabber.org/our_list")
    assert custom == RtblNode("pubsub.joinjabber.org", "our_list", ListKind.JID_SHA256)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("xmppbl.org", "SERVICE/NODE"),
        ("xmppbl.org/", "SERVICE/NODE"),
        ("/spam_source_domains", "SERVICE/NODE"),
        ("xmppbl.org/spam_source_ips", "not supported"),
        ("xmppbl.org/my_list", "unknown node name"),
        ("url_hosts:xmppbl.org/links", "not supported"),
        ("bad host!/spam_source_domains", "invalid service JID"),
    ],
)
def test_bad_node_specs_are_refused(spec: str, problem: str) -> None:
    with pytest.raises(RtblError, match=problem):
        parse_rtbl_node(spec)


def test_a_node_listed_twice_is_refused() -> None:
    with pytest.raises(RtblError, match="twice"):
        rtbl_nodes(["xmppbl.org/spam_source_domains", "XMPPBL.ORG/spam_source_domains"])


# --- what arrives -----------------------------------------------------------------------------


def _element(xml: str) -> ET.Element:
    return ET.fromstring(xml)


def test_events_become_node_updates() -> None:
    message = _element(
        f"<message xmlns='jabber:client' from='xmppbl.org'><event xmlns='{EVENT_NS}'>"
        "<items node='spam_source_domains'><item id='spam.example'><x/></item>"
        "<item/><retract id='old.example'/></items></event></message>"
    )
    assert parse_event(message) == (
        NodeUpdate("spam_source_domains", ("spam.example",), ("old.example",)),
    )
    purge = _element(f"<message><event xmlns='{EVENT_NS}'><purge node='n'/></event></message>")
    delete = _element(f"<message><event xmlns='{EVENT_NS}'><delete node='n'/></event></message>")
    assert parse_event(purge) == parse_event(delete) == (NodeUpdate("n", purged=True),)
    assert parse_event(_element("<message><body>hi</body></message>")) == ()


def test_items_results_and_rsm_pages() -> None:
    plain = _element(
        f"<iq type='result'><pubsub xmlns='{PUBSUB_NS}'><items node='n'>"
        "<item id='a.example'/><item id='b.example'/></items></pubsub></iq>"
    )
    page = parse_items_page(plain, "n")
    assert (page.ids, page.next_after) == (("a.example", "b.example"), None)
    paged = _element(
        f"<iq type='result'><pubsub xmlns='{PUBSUB_NS}'><items node='n'><item id='a.example'/>"
        f"</items><set xmlns='{RSM_NS}'><first index='0'>a.example</first>"
        "<last>a.example</last><count>3</count></set></pubsub></iq>"
    )
    assert parse_items_page(paged, "n").next_after == "a.example"
    with pytest.raises(RtblError, match="no <items"):
        parse_items_page(plain, "other")


def test_updates_apply_per_source_and_refuse_wildcards() -> None:
    blocklist = BlockList.of(source="policy", domains=["spam.example"])
    assert apply_items(blocklist, DOMAINS, ["spam.example", "junk.example", "*.example", "x y"])
    assert blocklist.entries("domains", source=DOMAINS.source) == ("junk.example", "spam.example")
    invalid = apply_update(
        blocklist, DOMAINS, NodeUpdate(DOMAINS.node, ("*.wide.example", "new.example"))
    )
    assert invalid == 1
    assert blocklist.match_domain("x.wide.example") is None
    apply_update(blocklist, DOMAINS, NodeUpdate(DOMAINS.node, retracted=("spam.example",)))
    hit = blocklist.match_domain("spam.example")
    assert hit is not None and hit.sources == ("policy",)  # the policy still lists it
    digest = jid_sha256("spammer@remote.example")
    apply_update(blocklist, HASHES, NodeUpdate(HASHES.node, (digest.upper(),)))
    assert blocklist.match_jid("Spammer@remote.example") is not None
    apply_update(blocklist, DOMAINS, NodeUpdate(DOMAINS.node, purged=True))
    assert blocklist.entries("domains", source=DOMAINS.source) == ()
    assert blocklist.match_jid("spammer@remote.example") is not None


def test_notifications_during_a_fetch_are_replayed_on_top_of_its_result() -> None:
    blocklist = BlockList()
    subscriber = RtblSubscriber(RtblConfig("rtbl@example.org", "pw", (DOMAINS,)), blocklist)
    subscriber._begin_fetch(DOMAINS)
    # Handled before the (older) items result: a publish, and a retract of a listed id.
    notify = SimpleNamespace(
        xml=_element(
            f"<message from='XMPPBL.org'><event xmlns='{EVENT_NS}'>"
            "<items node='spam_source_domains'><item id='late.example'/>"
            "<retract id='gone.example'/></items></event></message>"
        )
    )
    subscriber._on_event_message(notify)
    subscriber._finish_fetch(DOMAINS, ["gone.example", "old.example"])
    assert blocklist.entries("domains") == ("late.example", "old.example")
    # Later notifications are applied directly, and only from the node's service.
    forged = SimpleNamespace(
        xml=_element(
            f"<message from='evil.example'><event xmlns='{EVENT_NS}'>"
            "<items node='spam_source_domains'><retract id='old.example'/></items>"
            "</event></message>"
        )
    )
    subscriber._on_event_message(forged)
    assert blocklist.entries("domains") == ("late.example", "old.example")


def test_backoff_doubles_up_to_the_maximum_with_jitter() -> None:
    assert backoff_delay(0, 1.0, 300.0, lambda: 1.0) == 1.0
    assert backoff_delay(3, 1.0, 300.0, lambda: 1.0) == 8.0
    assert backoff_delay(3, 1.0, 300.0, lambda: 0.0) == 4.0
    assert backoff_delay(100, 1.0, 300.0, lambda: 1.0) == 300.0


def test_the_password_is_not_in_repr_or_the_sasl_log(caplog: pytest.LogCaptureFixture) -> None:
    config = RtblConfig("rtbl@example.org", "hunter2-secret", (DOMAINS,))
    assert "hunter2" not in repr(config)
    subscriber = RtblSubscriber(config, BlockList())
    assert subscriber.config.password == "hunter2-secret"
    install_sasl_redaction()
    stream_log = logging.getLogger("slixmpp.xmlstream.xmlstream")
    with caplog.at_level(logging.DEBUG, logger="slixmpp.xmlstream.xmlstream"):
        stream_log.debug(
            "SEND: %s",
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
            "AHJ0YmwAaHVudGVyMi1zZWNyZXQ=</auth>",
        )
        stream_log.debug("SEND: %s", "<presence/>")
    assert "AHJ0YmwAaHVudGVyMi1zZWNyZXQ" not in caplog.text
    assert "<presence/>" in caplog.text


# --- block-list files -------------------------------------------------------------------------


def test_file_specs() -> None:
    spec = parse_list_file_spec("jabberspam:/etc/stanzaguard/blacklist.txt")
    assert spec == ListFile("jabberspam", Path("/etc/stanzaguard/blacklist.txt"))
    assert (spec.kind, spec.source) == (ListKind.DOMAINS, "/etc/stanzaguard/blacklist.txt")
    assert parse_list_file_spec("jid_sha256:C:/lists/h.txt").path == Path("C:/lists/h.txt")
    for bad in ("/etc/list.txt", "ips:/etc/list.txt", "domains:"):
        with pytest.raises(BlocklistFileError):
            parse_list_file_spec(bad)
    with pytest.raises(BlocklistFileError, match="twice"):
        parse_list_file_specs(["domains:/a.txt", "jabberspam:/a.txt"])


def _rewrite(path: Path, text: str) -> None:
    """Replace the file the way list downloads do (new inode), so any change is visible."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_jabberspam_file_loads_and_reloads_on_change(tmp_path: Path) -> None:
    path = tmp_path / "blacklist.txt"
    path.write_bytes(b"spam.example\r\njabber.evil.example\r\n\r\n")
    blocklist = BlockList()
    watcher = BlocklistFileWatcher([parse_list_file_spec(f"jabberspam:{path}")], blocklist)
    watcher.load_all()
    source = str(path)
    assert blocklist.entries("domains", source=source) == ("jabber.evil.example", "spam.example")
    hit = blocklist.match_domain("spam.example")
    assert hit is not None and hit.sources == (source,)
    assert blocklist.match_domain("sub.spam.example") is None  # JabberSPAM: exact domains
    assert watcher.check() == 0  # unchanged

    _rewrite(path, "spam.example\nnew.example\n")
    assert watcher.check() == 1
    assert blocklist.entries("domains", source=source) == ("new.example", "spam.example")

    # A broken version (an HTML error page) is refused as a whole; the last list stays.
    _rewrite(path, "<html><body>502 Bad Gateway</body></html>\n")
    assert watcher.check() == 0
    assert watcher.errors == 1
    assert blocklist.entries("domains", source=source) == ("new.example", "spam.example")

    # So does a file that went away; once back, it is read again.
    path.unlink()
    assert watcher.check() == 0
    assert blocklist.entries("domains", source=source) == ("new.example", "spam.example")
    _rewrite(path, "")
    assert watcher.check() == 1
    assert blocklist.entries("domains", source=source) == ()
    assert watcher.reloads == 2


def test_a_bad_file_at_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "hashes.txt"
    path.write_text("# hashes\nnot-a-hash\n")
    watcher = BlocklistFileWatcher([ListFile("jid_sha256", path)], BlockList())
    with pytest.raises(BlocklistFileError, match="line 2"):
        watcher.load_all()
    missing = BlocklistFileWatcher([ListFile("domains", tmp_path / "nope.txt")], BlockList())
    with pytest.raises(BlocklistFileError, match="cannot read"):
        missing.load_all()


# --- against a real pubsub service ------------------------------------------------------------


@pytest.fixture
def prosody(prosody_factory: ProsodyFactory) -> ProsodyServer:
    return prosody_factory(rtbl_prosody_config(), users=RTBL_USERS)


@pytest.fixture
async def publisher(prosody: ProsodyServer) -> AsyncIterator[Publisher]:
    operator = Publisher(prosody)
    await operator.connect()
    try:
        yield operator
    finally:
        await operator.disconnect()


def subscriber_config(prosody: ProsodyServer, **overrides: object) -> RtblConfig:
    values: dict[str, object] = {
        "jid": prosody.jid(RTBL_USER),
        "password": prosody.users[RTBL_USER],
        "nodes": rtbl_nodes(
            [f"{prosody.pubsub_domain}/{DOMAINS_NODE}", f"{prosody.pubsub_domain}/{JIDS_NODE}"]
        ),
        "host": prosody.host,
        "port": prosody.c2s_port,
        "tls": TlsMode.STARTTLS,
        "ssl_context": ssl.create_default_context(cafile=str(prosody.tls.ca)),
        "backoff_initial": 0.1,
        "backoff_max": 1.0,
        "request_timeout": 10.0,
        "connect_timeout": 10.0,
    }
    values.update(overrides)
    return RtblConfig(**values)  # type: ignore[arg-type]


@pytest.mark.integration
async def test_subscriber_follows_initial_items_publishes_retracts_and_purges(
    prosody: ProsodyServer, publisher: Publisher
) -> None:
    service = prosody.pubsub_domain
    domains_source, jids_source = f"{service}/{DOMAINS_NODE}", f"{service}/{JIDS_NODE}"
    await publisher.create(DOMAINS_NODE)
    await publisher.create(JIDS_NODE)
    await publisher.publish(DOMAINS_NODE, "spam.example")
    await publisher.publish(DOMAINS_NODE, "not a domain!")
    await publisher.publish(JIDS_NODE, jid_sha256("bot@spam.example"))

    blocklist = BlockList()
    subscriber = RtblSubscriber(subscriber_config(prosody), blocklist)
    await subscriber.start()
    try:
        await eventually(subscriber.synced.is_set, "both nodes fetched")
        assert blocklist.entries("domains", source=domains_source) == ("spam.example",)
        assert subscriber.invalid_items == 1
        assert blocklist.entries("jid_sha256", source=jids_source) == (
            jid_sha256("bot@spam.example"),
        )
        assert blocklist.match_jid("bot@spam.example") is not None
        assert blocklist.match_jid("someone@spam.example") is None

        await publisher.publish(DOMAINS_NODE, "live.example")
        await eventually(
            lambda: blocklist.match_domain("live.example") is not None, "a live publish"
        )
        await publisher.retract(DOMAINS_NODE, "spam.example")
        await eventually(lambda: blocklist.match_domain("spam.example") is None, "a retraction")
        assert blocklist.entries("domains", source=domains_source) == ("live.example",)

        await publisher.purge(JIDS_NODE)
        await eventually(lambda: blocklist.match_jid("bot@spam.example") is None, "a purge")
        assert blocklist.entries("domains", source=domains_source) == ("live.example",)
        assert blocklist.sources() == (domains_source,)
        assert subscriber.sessions == 1
    finally:
        await subscriber.stop()
    assert not subscriber.connected
    assert "rtbl-subscriber-secret" not in prosody.log_text()


@pytest.mark.integration
async def test_subscriber_reconnects_and_resyncs_after_the_server_restarts(
    prosody: ProsodyServer, publisher: Publisher
) -> None:
    await publisher.create(DOMAINS_NODE)
    await publisher.create(JIDS_NODE)
    await publisher.publish(DOMAINS_NODE, "first.example")
    blocklist = BlockList()
    subscriber = RtblSubscriber(subscriber_config(prosody), blocklist)
    await subscriber.start()
    try:
        await eventually(subscriber.synced.is_set, "nodes fetched")
        await publisher.disconnect()
        prosody.stop()
        await eventually(lambda: not subscriber.connected, "the subscriber noticed")
        # Entries stay in force while the list cannot be reached.
        assert blocklist.match_domain("first.example") is not None
        prosody.start()
        # Changed while the subscriber was away: only a fresh fetch can tell.
        operator = Publisher(prosody)
        await operator.connect()
        try:
            await operator.retract(DOMAINS_NODE, "first.example")
            await operator.publish(DOMAINS_NODE, "second.example")
            await eventually(
                lambda: subscriber.sessions >= 2 and subscriber.synced.is_set(),
                "reconnected and fetched again",
                timeout=30.0,
            )
            await eventually(
                lambda: blocklist.entries("domains") == ("second.example",), "the new list"
            )
        finally:
            await operator.disconnect()
    finally:
        await subscriber.stop()


@pytest.mark.integration
async def test_a_wrong_password_is_retried_with_backoff_and_never_logged(
    prosody: ProsodyServer, caplog: pytest.LogCaptureFixture
) -> None:
    password = "wrong-password-xyz"
    subscriber = RtblSubscriber(subscriber_config(prosody, password=password), BlockList())

    def failures() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if str(getattr(r, "reason", "")).startswith("authentication failed")
        ]

    with caplog.at_level(logging.DEBUG):  # slixmpp's stream log included
        await subscriber.start()
        try:
            await eventually(lambda: len(failures()) >= 2, "two failed attempts logged")
            assert not subscriber.connected
            assert subscriber.sessions == 0
        finally:
            await subscriber.stop()
    plain_sasl = base64.b64encode(f"\0{RTBL_USER}\0{password}".encode()).decode()
    assert password not in caplog.text
    assert plain_sasl not in caplog.text
