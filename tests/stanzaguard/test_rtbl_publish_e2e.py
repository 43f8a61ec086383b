"""The published block list, proven with real consumers that run no StanzaGuard code.

One real Prosody plays every part. ``localhost`` is the organisation's server: alice logs in
through StanzaGuard; bob logs in straight to Prosody. ``remote.localhost`` stands for the
federated network (eve the spammer, frank a partner; straight to Prosody). ``pubsub.localhost``
hosts StanzaGuard's nodes, published as ``rtbladmin``. Then two consumers from Debian's
``prosody-modules``, configured as their READMEs say:

- ``mod_firewall`` with a script that reads StanzaGuard's HTTP lists
  (``%LIST spammers: http://…/api/v1/rtbl/jids.txt (ttl: 1)``) and bounces messages from
  listed JIDs and domains. It delivers to bob, whose path has no StanzaGuard in it.
- ``mod_muc_rtbl`` on a MUC service ``rooms.localhost`` (``muc_rtbl_jid``,
  ``muc_rtbl_node = "muc_bans_sha256"``), subscribed to StanzaGuard's node. Its one
  subscription is sent when the module loads, which Prosody's host start-up order can make
  go nowhere; the test reloads the module through Prosody's console once every host is up
  (`subscribed_mod_muc_rtbl`), so the proof never depends on that order.

StanzaGuard learns eve the way a deployment does: her first contact with a URL is
quarantined (policy), an officer confirms it as spam, the listing rule (auto mode) lists her,
the publisher publishes and the API serves the list. Waits poll (generous deadlines, no timing
assertions). mod_firewall re-reads an HTTP list every ``ttl`` plus a random 0-60 s, so the
firewall wait allows 100 s.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from archive_api.store.records import ArchiveRecord
from stanzaguard.api_wiring import RunningApi, start_api
from stanzaguard.clock import SystemClock
from stanzaguard.settings import load_settings
from tests.conftest import ProsodyFactory
from tests.stanzaguard.conftest import (
    ArchivingFactory,
    ArchivingProxy,
    remote_clients,
    send,
    stanza_error,
)
from tests.support.clients import ChatClient, TlsMode
from tests.support.prosody import (
    ProsodyConfig,
    ProsodyServer,
    ProsodyShellUnavailable,
    lua_string,
)
from tests.support.rtbl import RTBL_ADMIN, RTBL_USERS
from tests.support.services import free_port, service_unavailable

REMOTE = "remote.localhost"
ROOMS = "rooms.localhost"
REMOTE_USERS = {"eve": "eve-secret", "frank": "frank-secret"}
EVE = f"eve@{REMOTE}"
SPAM = "You won! Claim it at http://prize.example/claim"
TIMEOUT = 10.0
MUC_NS = "http://jabber.org/protocol/muc"
STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
FIREWALL_WAIT = 100.0
#: How long mod_muc_rtbl gets to log its subscription after the reload (it is local: at once).
SUBSCRIBE_WAIT = 20.0
POLICY = """
version = 1
local_domains = ["localhost"]

[strangers]
first_contact_url = "quarantine"
"""

pytestmark = pytest.mark.integration


def firewall_script(api_port: int) -> str:
    base = f"http://127.0.0.1:{api_port}/api/v1/rtbl"
    return f"""\
%LIST spammers: {base}/jids.txt (ttl: 1)
%LIST spamdomains: {base}/domains.txt (ttl: 1)

KIND: message
CHECK LIST: spammers contains $<@from|bare>
BOUNCE=policy-violation (Listed as a spam source by StanzaGuard)

KIND: message
CHECK LIST: spamdomains contains $<@from|host>
BOUNCE=policy-violation (Domain listed as a spam source by StanzaGuard)
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the prosody user can read (pytest's tmp_path may be 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="sg-rtbl-pub-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def api_port() -> int:
    return free_port()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "stanzaguard"


SETTINGS: dict[str, Any] = {
    "blocklist_learning": True,
    "blocklist_review": "auto",
    "blocklist_http": "public",
    "blocklist_http_plain_jids": True,
    "environment": "development",
    "model": "off",
}


@pytest.fixture
async def api(data_dir: Path, api_port: int) -> AsyncIterator[RunningApi]:
    """StanzaGuard's API, up before Prosody: mod_firewall fetches its lists at start."""
    settings = load_settings(data_dir=data_dir, domain=["localhost"], **SETTINGS)
    running = await start_api(settings, SystemClock(), f"127.0.0.1:{api_port}")
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
def prosody(
    prosody_factory: ProsodyFactory, api: RunningApi, api_port: int, shared_dir: Path
) -> ProsodyServer:
    script = shared_dir / "stanzaguard.pfw"
    script.write_text(firewall_script(api_port))
    script.chmod(0o644)
    config = ProsodyConfig(
        # admin_shell: the console that reloads mod_muc_rtbl (`subscribed_mod_muc_rtbl`).
        extra_modules=("firewall", "admin_shell"),
        extra_global="\n".join(
            [
                f'admins = {{ "{RTBL_ADMIN}@localhost" }}',
                f"firewall_scripts = {{ {lua_string(str(script))} }}",
                # mod_muc_rtbl subscribes once, at start: before StanzaGuard made its node.
                "autocreate_on_subscribe = true",
            ]
        ),
        extra_config="\n".join(
            [
                f'VirtualHost "{REMOTE}"',
                "",
                f'Component "{ROOMS}" "muc"',
                '    modules_enabled = { "muc_rtbl" }',
                '    muc_rtbl_jid = "pubsub.localhost"',
                '    muc_rtbl_node = "muc_bans_sha256"',
                "    muc_room_locking = false",
            ]
        ),
    )
    server = prosody_factory(config, users=RTBL_USERS)
    for user, password in REMOTE_USERS.items():
        server.register_on_host(REMOTE, user, password)
    return server


@pytest.fixture
async def remote(prosody: ProsodyServer) -> AsyncIterator[Callable[[str], Awaitable[ChatClient]]]:
    async with remote_clients(prosody, REMOTE, REMOTE_USERS) as connect:
        yield connect


@pytest.fixture
async def running(
    archiving_factory: ArchivingFactory, prosody: ProsodyServer, data_dir: Path
) -> ArchivingProxy:
    return await archiving_factory(
        policy=POLICY,
        data_dir=data_dir,
        rtbl_publish_service=prosody.pubsub_domain,
        rtbl_publish_jid=prosody.jid(RTBL_ADMIN),
        rtbl_publish_password=prosody.users[RTBL_ADMIN],
        rtbl_publish_server=f"{prosody.host}:{prosody.c2s_port}",
        rtbl_publish_tls="plain",
        **SETTINGS,
    )


async def direct(prosody: ProsodyServer, user: str, *, muc: bool = False) -> ChatClient:
    client = ChatClient(
        prosody.jid(user),
        prosody.users[user],
        host=prosody.host,
        port=prosody.c2s_port,
        tls=TlsMode.PLAIN,
        muc=muc,
    )
    await client.connect()
    return client


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.1)


async def learn_eve(running: ArchivingProxy, eve: ChatClient, alice: ChatClient) -> None:
    """Eve's first contact with a URL is held; an officer confirms it as spam."""
    eve.send_chat(alice.bare_jid, SPAM)

    async def held() -> ArchiveRecord | None:
        await running.drain()
        page = await running.store.search(f"from:{EVE}", limit=10)
        found = [hit.record for hit in page.hits if hit.record.body == SPAM]
        return found[0] if found else None

    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    record = await held()
    while record is None:
        assert loop.time() < deadline, "eve's message was not archived"
        await asyncio.sleep(0.1)
        record = await held()
    quarantine = running.service.quarantine
    assert quarantine is not None
    outcome = await quarantine.confirm_spam(record.record_id, "officer-1")
    assert outcome.ok, outcome.detail


async def test_mod_firewall_bounces_a_spammer_stanzaguard_learned(
    prosody: ProsodyServer,
    running: ArchivingProxy,
    remote: Callable[[str], Awaitable[ChatClient]],
    api_port: int,
) -> None:
    alice = running.client("alice")
    await alice.connect()
    await alice.xmpp.get_roster()  # as clients do: the proxy learns who her contacts are
    bob = await direct(prosody, "bob")  # no StanzaGuard on bob's path
    eve, frank = await remote("eve"), await remote("frank")
    try:
        outcome, _ = await send(eve, bob, "hello bob, before anyone knew")
        assert outcome == "delivered"

        await learn_eve(running, eve, alice)
        lists = f"http://127.0.0.1:{api_port}/api/v1/rtbl"
        async with httpx.AsyncClient() as http:

            async def served() -> bool:
                text = (await http.get(f"{lists}/jids.txt")).text
                return text.splitlines() == [EVE]

            await eventually(served, "the HTTP list names eve", TIMEOUT)
            hashed = (await http.get(f"{lists}/jids-sha256.txt")).text
            assert hashed == hashlib.sha256(EVE.encode()).hexdigest() + "\n"

        # mod_firewall polls its list: probe until eve's next message is bounced.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FIREWALL_WAIT
        probe = 0
        while True:
            probe += 1
            outcome, message = await send(eve, bob, f"buy now #{probe}")
            if outcome == "bounced":
                break
            assert loop.time() < deadline, "mod_firewall never bounced eve"
            await asyncio.sleep(1.0)
        _type, condition, text = stanza_error(message)
        assert condition == "policy-violation"
        assert "StanzaGuard" in text
        # Frank, on the same remote domain but not listed, still gets through.
        outcome, _ = await send(frank, bob, "hello from a partner")
        assert outcome == "delivered"
    finally:
        for client in (alice, bob):
            await client.disconnect()


async def subscribed_mod_muc_rtbl(prosody: ProsodyServer) -> None:
    """Make mod_muc_rtbl's subscription certain, whatever order Prosody started its hosts in.

    mod_muc_rtbl subscribes (through mod_pubsub_subscription) once, when the module loads on
    its host, and never retries. Prosody activates its hosts in no fixed order (a walk over a
    Lua table); when the MUC host comes first, the request goes out over s2s and fails
    ("failed outgoing connection to pubsub.localhost", then "Failed to subscribe to RTBL").
    Reloading the module once every host is active (the console's ``module:reload``) sends
    the subscription again, to a pubsub host that is certainly there, and fetches the node's
    items (``prosody.start_time`` is set by then). It is done on every start, so every run
    takes the same path. No "RTBL active" after the reload is a failure: the node or the
    module is broken, which is what this test is here to catch.
    """
    since = len(prosody.log_text())  # the reload's part of the log begins here
    try:
        await asyncio.to_thread(prosody.shell, "module", "reload", "muc_rtbl", ROOMS)
    except ProsodyShellUnavailable as exc:
        # The console needs LuaSocket's unix sockets: a broken image, reported as such
        # (a failure under STANZAGUARD_REQUIRE_SERVICES=1, as CI runs).
        service_unavailable(f"Prosody's console (mod_admin_shell) is not reachable: {exc}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SUBSCRIBE_WAIT
    while "RTBL active" not in prosody.log_text()[since:]:
        if loop.time() > deadline:
            pytest.fail(
                "mod_muc_rtbl did not subscribe after it was reloaded with every host up:\n"
                + prosody.log_text()[since:][-3000:]
            )
        await asyncio.sleep(0.1)


async def test_mod_muc_rtbl_keeps_a_listed_jid_out_of_the_room(
    prosody: ProsodyServer,
    running: ArchivingProxy,
    remote: Callable[[str], Awaitable[ChatClient]],
) -> None:
    room = f"lobby@{ROOMS}"
    await subscribed_mod_muc_rtbl(prosody)
    alice = running.client("alice")
    await alice.connect()
    await alice.xmpp.get_roster()  # as clients do: the proxy learns who her contacts are
    bob = await direct(prosody, "bob", muc=True)
    eve = await remote("eve")
    eve_muc = ChatClient(
        EVE,
        REMOTE_USERS["eve"],
        host=prosody.host,
        port=prosody.c2s_port,
        tls=TlsMode.PLAIN,
        muc=True,
    )
    await eve_muc.connect()
    try:
        await bob.join_room(room, "bob")
        await eve_muc.join_room(room, "eve")  # not listed yet: she may join and post
        eve_muc.send_groupchat(room, "hi all")
        await bob.next_message(TIMEOUT, where=lambda m: m.body == "hi all")

        await learn_eve(running, eve, alice)
        publishing = running.service.rtbl_publishing
        assert publishing is not None and publishing.publisher is not None
        publisher = publishing.publisher
        eve_hash = hashlib.sha256(EVE.encode()).hexdigest()

        async def published() -> bool:
            return eve_hash in publisher.published.get("muc_bans_sha256", set())

        await eventually(published, "eve's hash on muc_bans_sha256", TIMEOUT)

        # mod_muc_rtbl learns of the item from a pubsub notification that may still be on its
        # way: she posts until a post is refused, and nobody sees the refused one.
        attempt = 0
        refused_body = ""

        async def refused() -> bool:
            nonlocal attempt, refused_body
            attempt += 1
            body = f"spam for everyone {attempt}"
            posted = eve_muc.send_groupchat(room, body)
            if any(m.type == "error" and m.id == posted for m in await eve_muc.drain(1.0)):
                refused_body = body
                return True
            return False

        await eventually(refused, "eve's groupchat refused", TIMEOUT)
        assert refused_body not in [m.body for m in await bob.drain(0.5)]
        # A fresh join is refused too.
        await eve_muc.disconnect()
        again = ChatClient(
            EVE,
            REMOTE_USERS["eve"],
            host=prosody.host,
            port=prosody.c2s_port,
            tls=TlsMode.PLAIN,
            muc=True,
        )
        await again.connect()
        try:
            refusals: asyncio.Queue[ET.Element] = asyncio.Queue()
            again.xmpp.add_event_handler("presence_error", lambda p: refusals.put_nowait(p.xml))
            again.send_raw(f"<presence to='{room}/eve2'><x xmlns='{MUC_NS}'/></presence>")
            refusal = await asyncio.wait_for(refusals.get(), TIMEOUT)
            error = refusal.find("{jabber:client}error")
            assert error is not None, ET.tostring(refusal)
            assert error.find(f"{{{STANZAS_NS}}}forbidden") is not None, ET.tostring(refusal)
        finally:
            await again.disconnect()
    finally:
        for client in (alice, bob, eve_muc):
            await client.disconnect()
