"""The test infrastructure itself, run directly against Prosody (no proxy in between).

These tests are also the executable record of what Prosody 0.12 on Debian does with the
throwaway config from ``tests/support/prosody.py``: which SASL mechanisms it offers, where
offline messages land, how the Debian command-line clients talk to it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from slixmpp import ComponentXMPP

from tests.conftest import ClientFactory, ProsodyFactory
from tests.support import services
from tests.support.certs import TlsPair
from tests.support.clients import (
    AuthenticationFailed,
    CarbonKind,
    ChatClient,
    ClientConnectError,
    TlsMode,
    go_sendxmpp,
    sendxmpp,
)
from tests.support.luadata import LuaTable, parse_item_list, parse_value, stanza_to_element
from tests.support.prosody import (
    DIRECTORY_PREFIX,
    ProsodyConfig,
    ProsodyServer,
    encode_path_part,
)

pytestmark = pytest.mark.integration


def unique(text: str) -> str:
    # A body no other test or retry could have produced, so a stale match cannot pass a test.
    return f"{text} {uuid.uuid4().hex[:12]}"


# -- slixmpp clients -----------------------------------------------------------------------------


async def test_two_clients_chat_over_starttls(
    prosody: ProsodyServer, make_client: ClientFactory
) -> None:
    alice = make_client("alice", resource="desk")
    bob = make_client("bob", resource="phone")
    await alice.connect()
    await bob.connect()
    assert alice.tls_active and bob.tls_active
    assert alice.jid == "alice@localhost/desk"

    hello = unique("hello bob")
    sent_id = alice.send_chat(prosody.jid("bob"), hello)
    got = await bob.next_message()
    assert (got.body, got.from_, got.type, got.id) == (hello, alice.jid, "chat", sent_id)
    assert not got.delayed and not got.is_carbon

    reply = unique("hi alice")
    bob.send_chat(alice.jid, reply)
    assert (await alice.next_message()).body == reply


async def test_direct_tls_and_plain_ports(
    prosody: ProsodyServer, make_client: ClientFactory
) -> None:
    assert prosody.c2s_direct_tls_port is not None
    direct = make_client("alice", port=prosody.c2s_direct_tls_port, tls=TlsMode.DIRECT)
    plain = make_client("bob", tls=TlsMode.PLAIN)
    await direct.connect()
    await plain.connect()
    assert direct.tls_active
    # The proxy's upstream leg: no TLS, so the server offers no -PLUS mechanism at all.
    assert not plain.tls_active
    assert not any(m.endswith("-PLUS") for m in plain.offered_mechanisms)

    body = unique("over direct TLS")
    direct.send_chat(prosody.jid("bob"), body)
    assert (await plain.next_message()).body == body


async def test_certificate_verifies_against_its_own_ca(
    prosody: ProsodyServer, make_client: ClientFactory, tls_pair: TlsPair
) -> None:
    trusted = make_client("alice", ca_file=prosody.tls.ca)
    await trusted.connect()
    assert trusted.tls_active

    # Same names, different key: verification must fail on the signature, not the name.
    untrusting = make_client("bob", ca_file=tls_pair.ca)
    with pytest.raises(ClientConnectError):
        await untrusting.connect(timeout=5)


async def test_channel_binding_is_offered_on_tls12_only(
    prosody: ProsodyServer, make_client: ClientFactory
) -> None:
    # Prosody 0.12 knows only tls-unique, which TLS 1.3 does not define.
    tls12 = make_client("alice", tls_max_version=ssl.TLSVersion.TLSv1_2)
    tls13 = make_client("bob")
    await tls12.connect()
    await tls13.connect()
    assert (tls12.tls_version, tls13.tls_version) == ("TLSv1.2", "TLSv1.3")
    assert "SCRAM-SHA-1-PLUS" in tls12.offered_mechanisms
    assert tls12.mechanism_used == "SCRAM-SHA-1-PLUS"
    assert not any(m.endswith("-PLUS") for m in tls13.offered_mechanisms)


async def test_connection_refused_is_a_clear_error() -> None:
    # Nothing listens on a port that was just free: slixmpp alone would retry forever.
    client = ChatClient("alice@localhost", "pw", port=services.free_port())
    with pytest.raises(ClientConnectError, match="cannot connect"):
        await client.connect()
    await client.disconnect()


@pytest.mark.parametrize(
    ("mechanism", "password_hash"),
    [("PLAIN", "SHA-1"), ("SCRAM-SHA-1", "SHA-1"), ("SCRAM-SHA-256", "SHA-256")],
)
async def test_sasl_mechanisms(
    prosody_factory: ProsodyFactory, mechanism: str, password_hash: str
) -> None:
    server = prosody_factory(ProsodyConfig(password_hash=password_hash))
    client = ChatClient(
        server.jid("alice"), server.users["alice"], port=server.c2s_port, mechanism=mechanism
    )
    try:
        await client.connect()
        assert client.mechanism_used == mechanism
    finally:
        await client.disconnect()


@pytest.mark.parametrize(
    ("password_hash", "offered", "missing"),
    [("SHA-1", "SCRAM-SHA-1", "SCRAM-SHA-256"), ("SHA-256", "SCRAM-SHA-256", "SCRAM-SHA-1")],
)
async def test_internal_hashed_offers_exactly_one_scram(
    prosody_factory: ProsodyFactory, password_hash: str, offered: str, missing: str
) -> None:
    server = prosody_factory(ProsodyConfig(password_hash=password_hash), users={"dave": "pw"})
    ok = ChatClient(server.jid("dave"), "pw", port=server.c2s_port, tls=TlsMode.PLAIN)
    try:
        await ok.connect()
        assert {"PLAIN", offered} <= ok.offered_mechanisms
        assert missing not in ok.offered_mechanisms
    finally:
        await ok.disconnect()

    refused = ChatClient(server.jid("dave"), "pw", port=server.c2s_port, mechanism=missing)
    with pytest.raises(AuthenticationFailed, match="no acceptable mechanism"):
        await refused.connect()


async def test_internal_plain_offers_both_scrams(prosody_factory: ProsodyFactory) -> None:
    server = prosody_factory(ProsodyConfig(authentication="internal_plain"), users={"dave": "pw"})
    for mechanism in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
        client = ChatClient(server.jid("dave"), "pw", port=server.c2s_port, mechanism=mechanism)
        try:
            await client.connect()
            assert client.mechanism_used == mechanism
        finally:
            await client.disconnect()


async def test_wrong_password_is_a_clear_error(
    prosody: ProsodyServer, make_client: ClientFactory
) -> None:
    client = make_client("alice", password="not-the-password")
    with pytest.raises(AuthenticationFailed, match="not-authorized"):
        await client.connect()


async def test_stream_management(prosody: ProsodyServer, make_client: ClientFactory) -> None:
    alice = make_client("alice", stream_management=True)
    bob = make_client("bob")
    await alice.connect()
    await bob.connect()
    assert alice.sm_enabled

    body = unique("acked")
    bob.send_chat(prosody.jid("alice"), body)
    assert (await alice.next_message()).body == body


async def test_muc_with_three_occupants(prosody: ProsodyServer, make_client: ClientFactory) -> None:
    room = f"desk-{uuid.uuid4().hex[:8]}@{prosody.muc_domain}"
    clients = {user: make_client(user, muc=True) for user in ("alice", "bob", "carol")}
    for user, client in clients.items():
        await client.connect()
        await client.join_room(room, nick=user)

    body = unique("morning all")
    clients["alice"].send_groupchat(room, body)

    def is_body(message: object) -> bool:
        return getattr(message, "body", None) == body

    # Every occupant gets one copy, the sender included (the MUC reflects it).
    for client in clients.values():
        got = await client.next_message(where=is_body)
        assert (got.type, got.from_) == ("groupchat", f"{room}/alice")


async def test_carbons_reach_the_second_resource(
    prosody: ProsodyServer, make_client: ClientFactory
) -> None:
    laptop = make_client("alice", resource="laptop", carbons=True)
    phone = make_client("alice", resource="phone", carbons=True)
    bob = make_client("bob")
    for client in (laptop, phone, bob):
        await client.connect()

    incoming = unique("to the laptop")
    bob.send_chat(laptop.jid, incoming)
    assert (await laptop.next_message()).body == incoming
    copy = await phone.next_message()
    assert (copy.carbon, copy.body, copy.to) == (CarbonKind.RECEIVED, incoming, laptop.jid)

    outgoing = unique("from the laptop")
    laptop.send_chat(prosody.jid("bob"), outgoing)
    assert (await bob.next_message()).body == outgoing
    copy = await phone.next_message()
    assert (copy.carbon, copy.body, copy.from_) == (CarbonKind.SENT, outgoing, laptop.jid)


# -- offline storage and the Debian command-line clients -----------------------------------------


@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "direct-tls"])
def test_go_sendxmpp_delivers_to_offline_user(prosody: ProsodyServer, direct_tls: bool) -> None:
    port = prosody.c2s_direct_tls_port if direct_tls else prosody.c2s_port
    assert port is not None
    # Non-ASCII, markup characters and quotes exercise Prosody's \ddd escapes on disk.
    body = unique('grüße <b>&</b> "quoted"')
    result = go_sendxmpp(
        jid=prosody.jid("alice"),
        password=prosody.users["alice"],
        recipient=prosody.jid("bob"),
        message=body,
        port=port,
        direct_tls=direct_tls,
    )
    assert result.ok, result.describe()

    [stored] = prosody.offline_messages("bob")
    assert stored.body == body
    assert stored.sender.startswith("alice@localhost/")
    assert stored.to == "bob@localhost"
    assert stored.type == "chat"


@pytest.mark.parametrize("tls", list(TlsMode))
def test_sendxmpp_delivers_to_offline_user(prosody: ProsodyServer, tls: TlsMode) -> None:
    port = prosody.c2s_direct_tls_port if tls is TlsMode.DIRECT else prosody.c2s_port
    assert port is not None
    body = unique(f"sendxmpp over {tls}")
    result = sendxmpp(
        user="carol",
        domain=prosody.domain,
        password=prosody.users["carol"],
        recipient=prosody.jid("bob"),
        message=body,
        port=port,
        tls=tls,
    )
    assert result.ok, result.describe()
    assert [(m.sender, m.body) for m in prosody.offline_messages("bob")] == [
        ("carol@localhost/sendxmpp", body)
    ]


def test_cli_clients_fail_on_a_wrong_password(prosody: ProsodyServer) -> None:
    go = go_sendxmpp(
        jid=prosody.jid("alice"),
        password="wrong",
        recipient=prosody.jid("bob"),
        message="must not arrive",
        port=prosody.c2s_port,
    )
    perl = sendxmpp(
        user="alice",
        domain=prosody.domain,
        password="wrong",
        recipient=prosody.jid("bob"),
        message="must not arrive",
        port=prosody.c2s_port,
    )
    assert not go.ok, go.describe()
    assert not perl.ok, perl.describe()
    assert "not-authorized" in perl.stderr
    assert prosody.offline_messages("bob") == []


async def test_offline_messages_are_delivered_at_login(
    prosody: ProsodyServer, make_client: ClientFactory
) -> None:
    alice = make_client("alice")
    await alice.connect()
    body = unique("while you were out")
    alice.send_chat(prosody.jid("carol"), body)

    # Offline storage is written asynchronously from our point of view; poll the file.
    async def stored() -> list[str | None]:
        while not (bodies := [m.body for m in prosody.offline_messages("carol")]):
            await asyncio.sleep(0.02)
        return bodies

    assert await asyncio.wait_for(stored(), 10) == [body]

    carol = make_client("carol")
    await carol.connect()
    got = await carol.next_message()
    assert (got.body, got.delayed) == (body, True)
    assert prosody.offline_messages("carol") == []


# -- server lifecycle and components -------------------------------------------------------------


async def test_external_component_port(prosody_factory: ProsodyFactory) -> None:
    server = prosody_factory(ProsodyConfig(components={"archive.localhost": "s3cret"}))
    component = ComponentXMPP(  # type: ignore[no-untyped-call]
        "archive.localhost", "s3cret", server.host, server.component_port
    )
    started = asyncio.get_running_loop().create_future()
    component.add_event_handler("session_start", lambda _: started.set_result(True))
    component.connect()
    try:
        assert await asyncio.wait_for(started, 10)
    finally:
        component.abort()


async def test_given_certificate_and_restart(
    prosody_factory: ProsodyFactory, tls_pair: TlsPair
) -> None:
    server = prosody_factory(tls=tls_pair)
    for _ in range(2):  # the second round runs on the restarted server, same ports and data
        client = ChatClient(
            server.jid("alice"), server.users["alice"], port=server.c2s_port, ca_file=tls_pair.ca
        )
        try:
            await client.connect()
            assert client.tls_active
        finally:
            await client.disconnect()
        server.stop()
        server.start()


def test_stop_leaves_no_process_behind(prosody_factory: ProsodyFactory) -> None:
    server = prosody_factory(users={})
    pid = server.pid
    assert pid is not None and server.running
    assert services.port_is_open(server.host, server.c2s_port)

    server.stop()
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not services.port_is_open(server.host, server.c2s_port)


def test_servers_of_a_killed_test_run_are_reaped() -> None:
    # A child python makes a server and dies without teardown, as a SIGKILLed pytest would.
    services.require_binary("prosody")
    base = Path(tempfile.mkdtemp(prefix="sg-reap-test-"))
    base.chmod(0o755)
    try:
        script = (
            "import os, pathlib, sys\n"
            "from tests.support.prosody import make_prosody\n"
            "server = make_prosody(users={}, base_dir=pathlib.Path(sys.argv[1]))\n"
            "print(server.pid, server.directory, flush=True)\n"
            "os._exit(0)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, str(base)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parents[2],
            check=True,
        )
        pid_text, directory_text = done.stdout.split()
        pid, directory = int(pid_text), Path(directory_text)
        assert services.pid_alive(pid), "the abandoned server should still be running"

        assert services.reap_abandoned(base, DIRECTORY_PREFIX) == [directory]
        assert not services.pid_alive(pid)
        assert not directory.exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_config_lifts_limits_and_stays_on_loopback(prosody: ProsodyServer) -> None:
    config = prosody.config_path.read_text()
    assert '"limits"' not in config  # mod_limits (Debian's 10kb/s per client) is not loaded
    assert 'rate = "100mb/s"' in config  # and is lifted should a test load it
    assert "s2s_ports = {}" in config
    assert "nagle = false" in config
    for option in ("c2s_interfaces", "c2s_direct_tls_interfaces", "component_interfaces"):
        assert f'{option} = {{ "127.0.0.1" }}' in config


# -- helpers ---------------------------------------------------------------------------------------


def test_service_unavailable_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(services.REQUIRE_SERVICES_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        services.require_binary("definitely-not-a-binary-sg")
    monkeypatch.setenv(services.REQUIRE_SERVICES_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="definitely-not-a-binary-sg"):
        services.require_binary("definitely-not-a-binary-sg")


def test_free_port_is_bindable() -> None:
    port = services.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    with pytest.raises(TimeoutError):
        services.wait_for_port("127.0.0.1", port, timeout=0.1)


def test_lua_data_parser() -> None:
    value = parse_value(b'return { ["a\\"b"] = "x\\195\\169\\n"; n = 3; 1.5; true; nil; {} };')
    assert isinstance(value, LuaTable)
    assert value.fields == {'a"b': "xé\n", "n": 3}
    assert value.array[:3] == [1.5, True, None]

    [item] = parse_item_list(
        b'item({ { "hi"; ["name"] = "body"; ["attr"] = {} }; ["name"] = "message";'
        b' ["attr"] = { ["xml:lang"] = "en"; ["to"] = "b@x" } });\n'
    )
    element = stanza_to_element(item)
    assert element.findtext("body") == "hi"
    assert element.get("{http://www.w3.org/XML/1998/namespace}lang") == "en"


def test_data_path_encoding() -> None:
    assert encode_path_part("localhost") == "localhost"
    assert encode_path_part("conference.localhost") == "conference%2elocalhost"
    assert encode_path_part("jürgen") == "j%c3%bcrgen"
