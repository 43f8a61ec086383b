"""Issue 7, component mode end to end: a real Prosody forwards copies to `stanzaguard component`.

The Prosody of these tests runs Debian's prosody-modules `mod_firewall` with the script from
docs/integrations/component.md (`firewall_script`), and declares the external component
``archive.localhost``. `ComponentService` connects to it (XEP-0114) with its data in a fresh
directory and indexes in-process, so each test can drain the spool into the store.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import pytest
from slixmpp.exceptions import IqError

from archive_api.audit import AuditOutcome
from archive_api.store.audit import AuditFilter
from archive_api.store.records import (
    ArchiveRecord,
    Direction,
    ObservationVia,
    RecordKind,
    SpoolEntry,
)
from archive_api.store.sqlite import SqliteStore
from classifier.verdict import Action
from proxy.component import ComponentError
from stanzaguard.component_service import (
    ComponentService,
    add_block_domain,
    build_component_config,
)
from stanzaguard.errors import SettingsError
from stanzaguard.settings import Settings, load_settings
from tests.conftest import ClientFactory, ProsodyFactory
from tests.stanzaguard.conftest import ArchivingFactory, receive, run_cli
from tests.support.clients import ChatClient
from tests.support.prosody import ProsodyConfig, ProsodyServer
from tests.support.proxy import stanzaguard_command
from tests.support.services import start_process

COMPONENT = "archive.localhost"
SECRET = "component-test-secret"
TIMEOUT = 15.0


def firewall_script(component: str) -> str:
    """The mod_firewall script of docs/integrations/component.md for `component`."""
    return f"""\
# StanzaGuard component mode: a copy of every message and subscription stanza.
# RULEDEP=st must come with FORWARD= (Debian's prosody-modules), or delivery fails.

::preroute
KIND: message
TYPE: chat|normal|groupchat|headline
NOT TO: {component}
RULEDEP=st
FORWARD={component}

::preroute
KIND: presence
TYPE: subscribe|subscribed|unsubscribe|unsubscribed
NOT TO: {component}
RULEDEP=st
FORWARD={component}

::deliver
ENTERING: $local
KIND: message
TYPE: chat|normal|headline
RULEDEP=st
FORWARD={component}

::deliver
ENTERING: $local
KIND: presence
TYPE: subscribe|subscribed|unsubscribe|unsubscribed
RULEDEP=st
FORWARD={component}
"""


def component_config(**overrides: Any) -> ProsodyConfig:
    return ProsodyConfig(
        components={COMPONENT: SECRET}, firewall_script=firewall_script(COMPONENT), **overrides
    )


@pytest.fixture
def prosody(prosody_factory: ProsodyFactory) -> ProsodyServer:
    """This module's Prosody: the component declared and mod_firewall forwarding to it."""
    return prosody_factory(component_config())


class ComponentFactory(Protocol):
    async def __call__(
        self, *, data_dir: Path | None = None, policy: str | None = None, **settings: Any
    ) -> ComponentService: ...


@pytest.fixture
async def component_factory(
    prosody: ProsodyServer, tmp_path: Path
) -> AsyncIterator[ComponentFactory]:
    services: list[ComponentService] = []

    async def factory(
        *, data_dir: Path | None = None, policy: str | None = None, **settings: Any
    ) -> ComponentService:
        policy_path = None
        if policy is not None:
            policy_path = tmp_path / f"component-policy-{len(services)}.toml"
            policy_path.write_text(policy)
        settings.setdefault("model", "off")
        settings.setdefault("index_worker", False)
        loaded = load_settings(
            domain=[prosody.domain],
            component_jid=COMPONENT,
            component_secret=SECRET,
            component_server=f"{prosody.host}:{prosody.component_port}",
            data_dir=data_dir or tmp_path / f"component-{len(services)}",
            policy=policy_path,
            **settings,
        )
        service = ComponentService(loaded)
        services.append(service)
        await service.start()
        assert service.link is not None
        await asyncio.wait_for(service.link.connected.wait(), TIMEOUT)
        return service

    try:
        yield factory
    finally:
        for service in reversed(services):
            await service.stop()


async def eventually(
    probe: Callable[[], Awaitable[bool]], what: str, timeout: float = TIMEOUT
) -> None:
    """Poll `probe` until it holds (copies arrive asynchronously); fail naming `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await probe():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def indexed(service: ComponentService) -> None:
    assert service.link is not None
    await service.link.idle()
    await service.indexer.drain()


async def records(service: ComponentService, query: str) -> list[ArchiveRecord]:
    await indexed(service)
    page = await service.store.search(query, limit=1000)
    return [hit.record for hit in page.hits]


async def wait_records(service: ComponentService, query: str, count: int) -> list[ArchiveRecord]:
    found: list[ArchiveRecord] = []

    async def probe() -> bool:
        nonlocal found
        found = await records(service, query)
        return len(found) >= count

    await eventually(probe, f"{count} records for {query!r}")
    return found


async def chat(make_client: ClientFactory) -> tuple[ChatClient, ChatClient]:
    alice = make_client("alice", resource="laptop")
    bob = make_client("bob", resource="desk")
    await alice.connect()
    await bob.connect()
    return alice, bob


# -- forwarding ----------------------------------------------------------------------------------


async def test_both_directions_archived_once_with_verdict(
    component_factory: ComponentFactory, make_client: ClientFactory
) -> None:
    service = await component_factory()
    alice, bob = await chat(make_client)
    alice.send_chat(bob.jid, "hello bob, lunch?", id="m-1")
    await receive(bob, "hello bob, lunch?")
    bob.send_chat(alice.jid, "yes alice, at noon", id="m-2")
    await receive(alice, "yes alice, at noon")

    found = await wait_records(service, "type:chat", 2)
    await asyncio.sleep(0.3)  # a late duplicate copy would show up now
    found = await records(service, "type:chat")
    by_id = {r.message_id: r for r in found}
    assert set(by_id) == {"m-1", "m-2"} and len(found) == 2
    first, second = by_id["m-1"], by_id["m-2"]
    assert (first.sender, first.recipient, first.body) == (
        "alice@localhost",
        "bob@localhost",
        "hello bob, lunch?",
    )
    assert (second.sender, second.recipient) == ("bob@localhost", "alice@localhost")
    for record in found:
        assert record.verdict.action is Action.ALLOW
        assert record.direction is Direction.COPY
        assert {o.via for o in record.observations} == {ObservationVia.COMPONENT}
    assert service.spool.chain_name == "component"


async def test_subscription_requests_forwarded_and_archived(
    component_factory: ComponentFactory, make_client: ClientFactory
) -> None:
    service = await component_factory()
    alice, bob = await chat(make_client)
    alice.xmpp.send_presence_subscription(pto=bob.bare_jid, ptype="subscribe")
    # Bob's client answers (slixmpp authorises and subscribes back): each stanza of the
    # exchange is a copy of its own, each archived once.
    await wait_records(service, "type:subscription", 2)
    await asyncio.sleep(0.3)
    found = await records(service, "type:subscription")
    kinds = [(r.sender, r.recipient, r.stanza_type) for r in found]
    assert kinds.count(("alice@localhost", "bob@localhost", "subscribe")) == 1, kinds
    assert kinds.count(("bob@localhost", "alice@localhost", "subscribed")) == 1, kinds
    assert len(kinds) == len(set(kinds)), kinds
    for record in found:
        assert record.kind is RecordKind.SUBSCRIPTION
        assert record.verdict.action is Action.ALLOW


# -- resilience ----------------------------------------------------------------------------------


async def test_reconnects_after_a_server_restart(
    prosody: ProsodyServer, component_factory: ComponentFactory, make_client: ClientFactory
) -> None:
    service = await component_factory()
    link = service.link
    assert link is not None and link.stats.sessions == 1
    prosody.stop()
    await eventually(lambda: _async(not link.connected.is_set()), "the link to notice")
    prosody.start()
    await asyncio.wait_for(link.connected.wait(), TIMEOUT)
    assert link.stats.sessions == 2
    alice, bob = await chat(make_client)
    alice.send_chat(bob.jid, "after the restart", id="after-1")
    await receive(bob, "after the restart")
    (record,) = await wait_records(service, '"after the restart"', 1)
    assert record.message_id == "after-1"


async def _async(value: bool) -> bool:
    return value


async def test_copies_spooled_while_the_store_is_down_are_indexed_later(
    component_factory: ComponentFactory, make_client: ClientFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    service = await component_factory(data_dir=data_dir)
    indexer = service.indexer
    # Another process holding SQLite's write lock: the store refuses every batch meanwhile.
    blocker = sqlite3.connect(data_dir / "archive.sqlite3", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        alice, bob = await chat(make_client)
        alice.send_chat(bob.jid, "while the store is down", id="down-1")
        await receive(bob, "while the store is down")
        link = service.link
        assert link is not None
        await eventually(lambda: _async(link.stats.archived >= 1), "the copy spooled")
        entries = [
            SpoolEntry.from_payload(link.payload) for link in await service.spool.read_from(1, 100)
        ]
        bodies = [e.record.body for e in entries if e.record is not None]
        assert "while the store is down" in bodies
        await eventually(lambda: _async(indexer.failures >= 1), "the indexer to fail", 30.0)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    (record,) = await wait_records(service, '"while the store is down"', 1)
    assert record.message_id == "down-1"


async def test_inline_proxy_and_component_archive_a_message_once(
    archiving_factory: ArchivingFactory, component_factory: ComponentFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "shared"
    inline = await archiving_factory(data_dir=data_dir, index_worker=False)
    service = await component_factory(data_dir=data_dir)
    alice = inline.client("alice", resource="laptop")
    bob = inline.client("bob", resource="desk")
    await alice.connect()
    await bob.connect()
    alice.send_chat(bob.jid, "seen by both", id="both-1")
    await receive(bob, "seen by both")
    link = service.link
    assert link is not None
    await eventually(lambda: _async(link.stats.archived >= 1), "the component's copy")
    await inline.drain()
    found = await records(service, '"seen by both"')
    assert len(found) == 1, [r.record_id for r in found]
    vias = {o.via for o in found[0].observations}
    assert ObservationVia.COMPONENT in vias and ObservationVia.LIVE in vias, vias
    assert set(await service.store.chains()) >= {"spool", "component"}


# -- reports and admin commands --------------------------------------------------------------------


def report_block(jid: str) -> ET.Element:
    """A XEP-0191 block carrying a XEP-0377 spam report about `jid`."""
    return ET.fromstring(
        f"<block xmlns='urn:xmpp:blocking'><item jid='{jid}'>"
        "<report xmlns='urn:xmpp:reporting:1' reason='urn:xmpp:reporting:spam'>"
        "<text xml:lang='en'>unsolicited offer</text></report></item></block>"
    )


async def send_iq(client: ChatClient, to: str, payload: ET.Element) -> Any:
    """An iq set with `payload` to `to`; the answer (IqError raised for an error)."""
    iq: Any = client.xmpp.make_iq_set(ito=to)
    iq.append(payload)
    return await iq.send(timeout=TIMEOUT)


async def test_a_report_to_the_component_is_recorded_and_learned(
    component_factory: ComponentFactory, make_client: ClientFactory
) -> None:
    service = await component_factory()
    alice, bob = await chat(make_client)
    bob.send_chat(alice.jid, "cheap watches, reply now", id="spam-1")
    await receive(alice, "cheap watches, reply now")
    await wait_records(service, '"cheap watches"', 1)
    answer = await send_iq(alice, COMPONENT, report_block(bob.bare_jid))
    assert answer["type"] == "result"
    (report,) = await wait_records(service, "type:report", 1)
    assert report.kind is RecordKind.REPORT
    assert (report.sender, report.reported_jid, report.report_reason) == (
        "alice@localhost",
        "bob@localhost",
        "spam",
    )
    learning = service.learning
    assert learning is not None

    async def learned() -> bool:
        await learning.flush()
        return len(learning.examples) > 0

    await eventually(learned, "the report recorded as an example")
    (example,) = learning.examples.lines
    assert example.text == "cheap watches, reply now"


POLICY = """\
version = 1

# The officers' own list; the ad-hoc command adds to it and keeps this comment.
[blocklists]
domains = ["spam.example"]
"""


async def run_command(client: ChatClient, node: str, field: str, value: str) -> Any:
    """Execute an ad-hoc command, submit its one-field form; return the final answer."""
    adhoc: Any = client.xmpp.plugin["xep_0050"]
    first = await adhoc.send_command(COMPONENT, node, timeout=TIMEOUT)
    assert first["command"]["status"] == "executing"
    forms: Any = client.xmpp.plugin["xep_0004"]
    form: Any = forms.make_form(ftype="submit")
    form.add_field(var=field, value=value)
    return await adhoc.send_command(
        COMPONENT,
        node,
        action="complete",
        payload=form,
        sessionid=first["command"]["sessionid"],
        timeout=TIMEOUT,
    )


async def admin_events(service: ComponentService) -> list[Any]:
    assert service.audit is not None
    await service.audit.flush()
    page = await service.store.audit_events(AuditFilter(), limit=100)
    return [e for e in page.events if e.params.get("via") == "xmpp-adhoc"]


async def test_admin_commands_show_verdicts_and_change_the_policy_audited(
    component_factory: ComponentFactory, make_client: ClientFactory
) -> None:
    service = await component_factory(policy=POLICY, component_admins=["alice@localhost"])
    alice = make_client("alice", resource="laptop", plugins=["xep_0004", "xep_0050"])
    bob = make_client("bob", resource="desk")
    await alice.connect()
    await bob.connect()
    bob.send_chat(alice.jid, "a message to look up", id="look-1")
    await receive(alice, "a message to look up")
    await wait_records(service, '"a message to look up"', 1)

    answer = await run_command(alice, "recent-verdicts", "jid", "bob@localhost")
    assert answer["command"]["status"] == "completed"
    items = answer["command"]["form"]["items"]
    assert [(i["recipient"], i["action"]) for i in items] == [("alice@localhost", "allow")]

    answer = await run_command(alice, "deny-domain", "domain", "Junk.Example")
    assert answer["command"]["status"] == "completed"
    (note,) = answer["command"]["notes"]
    assert note[0] == "info" and "junk.example" in note[1], note
    policy_path = service.settings.policy
    assert policy_path is not None
    text = policy_path.read_text()
    assert "keeps this comment" in text and '"junk.example"' in text
    blocklists = service.policy.current.policy.blocklists
    assert blocklists is not None and "junk.example" in blocklists.domains

    # Bad input: an error note, nothing changed, and the attempt audited as invalid.
    for node, field, value in [
        ("deny-domain", "domain", "*"),
        ("deny-domain", "domain", "two words.example"),
        ("deny-domain", "domain", "x" * 5000),
        ("recent-verdicts", "jid", "no jid at all"),
        ("recent-verdicts", "jid", 'bob@localhost" OR from:*'),
    ]:
        answer = await run_command(alice, node, field, value)
        (note,) = answer["command"]["notes"]
        assert note[0] == "error", (value, note)
    assert policy_path.read_text() == text

    events = await admin_events(service)
    invalid = [e for e in events if e.outcome == AuditOutcome.INVALID.value]
    assert len(invalid) == 5, [e.params for e in events]
    by_command = {(e.params["command"], e.outcome) for e in events}
    assert ("recent-verdicts", AuditOutcome.OK.value) in by_command
    assert ("deny-domain", AuditOutcome.OK.value) in by_command
    ok = [e for e in events if e.outcome == AuditOutcome.OK.value]
    change = next(e for e in ok if e.params["command"] == "deny-domain")
    assert change.actor == "xmpp:alice@localhost" and change.action == "policy-change"
    assert change.params["new_version"] >= 1
    search = next(e for e in ok if e.params["command"] == "recent-verdicts")
    assert search.result_count == 1


async def test_admin_commands_refused_for_others_and_audited(
    component_factory: ComponentFactory, make_client: ClientFactory
) -> None:
    service = await component_factory(policy=POLICY, component_admins=["alice@localhost"])
    bob = make_client("bob", resource="desk", plugins=["xep_0004", "xep_0050"])
    await bob.connect()
    adhoc: Any = bob.xmpp.plugin["xep_0050"]
    for node in ("deny-domain", "recent-verdicts", "no-such-node"):
        with pytest.raises(IqError) as refused:
            await adhoc.send_command(COMPONENT, node, timeout=TIMEOUT)
        assert refused.value.condition == "forbidden"
    # A forged continuation of a session id is refused the same way.
    with pytest.raises(IqError) as refused:
        await adhoc.send_command(
            COMPONENT, "deny-domain", action="complete", sessionid="1-1", timeout=TIMEOUT
        )
    assert refused.value.condition == "forbidden"
    assert service.settings.policy is not None
    assert service.settings.policy.read_text() == POLICY

    async def audited() -> bool:
        return len(await admin_events(service)) >= 4

    await eventually(audited, "the refusals audited")
    events = await admin_events(service)
    assert {e.outcome for e in events} == {AuditOutcome.DENIED.value}
    assert {e.actor for e in events} == {"xmpp:bob@localhost/desk"}


# -- hostile input ---------------------------------------------------------------------------------


async def test_forged_plain_and_oversized_stanzas_are_not_archived(
    component_factory: ComponentFactory, make_client: ClientFactory
) -> None:
    service = await component_factory(max_stanza_bytes=4096)
    link = service.link
    assert link is not None
    alice, bob = await chat(make_client)
    # A user's own <forwarded/> to the component: Prosody stamps her JID as `from`.
    alice.send_raw(
        f"<message to='{COMPONENT}' type='chat'><forwarded xmlns='urn:xmpp:forward:0'>"
        "<message xmlns='jabber:client' from='carol@localhost/x' to='bob@localhost' "
        "type='chat' id='forged-1'><body>forged words</body></message></forwarded></message>"
    )
    # Plain chat with the component, and a copy too big to take.
    alice.send_chat(COMPONENT, "hello component", id="plain-1")
    big = "x" * 6000
    alice.send_chat(bob.jid, big, id="big-1")
    await receive(bob, big)
    await eventually(
        lambda: _async(link.stats.refused.get("oversized", 0) >= 1), "the big copy refused"
    )
    await eventually(lambda: _async(link.stats.refused.get("forged", 0) >= 1), "the forgery")
    # Still working afterwards.
    alice.send_chat(bob.jid, "after the garbage", id="after-2")
    await receive(bob, "after the garbage")
    await wait_records(service, '"after the garbage"', 1)
    found = await records(service, "type:chat")
    assert [r.message_id for r in found] == ["after-2"], [r.message_id for r in found]


# -- settings and policy edits (no server) -------------------------------------------------------


def component_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "domain": ["corp.example"],
        "component_jid": "archive.corp.example",
        "component_secret": "a-long-random-secret",
        "component_admins": "alice@corp.example, Officer@Corp.Example",
    }
    values.update(overrides)
    return load_settings(**values)


def test_component_settings_are_checked() -> None:
    config = build_component_config(component_settings(component_server="10.0.0.5:5348"))
    assert (config.jid, config.host, config.port) == ("archive.corp.example", "10.0.0.5", 5348)
    assert config.server_domains == frozenset({"corp.example"})
    assert config.admins == frozenset({"alice@corp.example", "officer@corp.example"})
    assert "a-long-random-secret" not in repr(config)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"component_secret": "changeme"}, "component_secret"),
        ({"component_secret": None}, "component_secret"),
        ({"component_jid": None}, "component_jid"),
        ({"component_jid": "user@archive.corp.example"}, "component_jid"),
        ({"component_admins": "corp.example"}, "component_admins"),
        ({"component_admins": "alice@corp.example/phone"}, "component_admins"),
        ({"domain": []}, "domain"),
    ],
)
def test_bad_component_settings_are_refused(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(SettingsError, match=key):
        build_component_config(component_settings(**overrides))


def test_a_placeholder_secret_is_accepted_only_in_development() -> None:
    settings = component_settings(component_secret="secret", environment="development")
    assert build_component_config(settings).secret == "secret"


def test_component_chain_name_is_checked() -> None:
    with pytest.raises(SettingsError, match="component_chain_name"):
        component_settings(component_chain_name="Not A Name")


def test_adding_a_block_domain_keeps_the_file_as_written() -> None:
    text = add_block_domain(POLICY, "junk.example")
    assert text is not None
    assert "keeps this comment" in text
    assert tomllib.loads(text)["blocklists"]["domains"] == ["spam.example", "junk.example"]
    assert add_block_domain(text, "junk.example") is None
    fresh = add_block_domain("", "junk.example")
    assert fresh is not None
    assert tomllib.loads(fresh) == {"version": 1, "blocklists": {"domains": ["junk.example"]}}
    other = add_block_domain('version = 1\n[federation]\nmode = "deny"\n', "junk.example")
    assert other is not None and tomllib.loads(other)["federation"] == {"mode": "deny"}


@pytest.mark.parametrize(
    "text",
    [
        "version = 1\nblocklists = 3\n",
        'version = 1\n[blocklists]\ndomains = "spam.example"\n',
        "version = = 1\n",
        "[[blocklists]]\n",
    ],
)
def test_policy_files_that_cannot_be_edited_are_refused(text: str) -> None:
    with pytest.raises(ComponentError):
        add_block_domain(text, "junk.example")


# -- the real command ------------------------------------------------------------------------------


async def test_the_component_command_archives_and_stops_cleanly(
    prosody: ProsodyServer, make_client: ClientFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STANZAGUARD_")}
    env.update(
        STANZAGUARD_COMPONENT_SECRET=SECRET,
        STANZAGUARD_LOG_FORMAT="text",
        STANZAGUARD_MODEL="off",
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
        str(data_dir),
    ]
    process = start_process(argv, log_path=tmp_path / "component.log", env=env)
    try:

        async def authenticated() -> bool:
            assert process.running, process.log_tail()
            return "External component successfully authenticated" in prosody.log_text()

        await eventually(authenticated, "the component's handshake", 60.0)
        alice, bob = await chat(make_client)
        alice.send_chat(bob.jid, "through the real command", id="cmd-1")
        await receive(bob, "through the real command")

        async def spooled() -> bool:
            # The copy itself in a segment (the spool directory has files from the start).
            segments = (data_dir / "component" / "spool").glob("segment-*.log")
            return any(b"through the real command" in path.read_bytes() for path in segments)

        await eventually(spooled, "the copy in the component's spool")
    finally:
        status = process.stop(grace=15.0)
    assert status == 0, process.log_tail()
    store = await SqliteStore.open(data_dir / "archive.sqlite3")
    try:
        page = await store.search('"through the real command"')
        assert [hit.record.message_id for hit in page.hits] == ["cmd-1"]
    finally:
        await store.close()


def test_the_component_command_refuses_a_missing_secret(tmp_path: Path) -> None:
    result = run_cli(
        "component",
        "--domain",
        "corp.example",
        "--jid",
        "archive.corp.example",
        "--data-dir",
        str(tmp_path),
    )
    assert result.returncode != 0
    assert "component_secret" in result.stdout + result.stderr
