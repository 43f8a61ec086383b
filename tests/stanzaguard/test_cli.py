"""`stanzaguard run`, the real console script, in front of a real Prosody."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from tests.support.clients import ChatClient, TlsMode, go_sendxmpp
from tests.support.prosody import ProsodyServer
from tests.support.proxy import start_stanzaguard, wait_until
from tests.support.services import port_is_open

pytestmark = pytest.mark.integration


async def test_run_relays_go_sendxmpp_and_stops_cleanly_on_sigterm(
    prosody: ProsodyServer, tmp_path: Path
) -> None:
    guard = start_stanzaguard(prosody, directory=tmp_path / "guard")
    bob: ChatClient | None = None
    try:
        # A client nobody in this project wrote, over STARTTLS through the command.
        body = f"through stanzaguard run {uuid.uuid4().hex[:12]}"
        result = await asyncio.to_thread(
            go_sendxmpp,
            jid=prosody.jid("alice"),
            password=prosody.users["alice"],
            recipient=prosody.jid("bob"),
            message=body,
            port=guard.port,
        )
        assert result.ok, f"{result.describe()}\n{guard.log_tail()}"
        # The client may be gone before the proxy's fsync'd spool lets the message through to
        # the server: wait for it there rather than read the server's store at once.
        await wait_until(lambda: bool(prosody.offline_messages("bob")))
        [stored] = prosody.offline_messages("bob")
        assert (stored.body, stored.to) == (body, "bob@localhost")
        assert stored.sender.startswith("alice@localhost/")

        # A live session over direct TLS when SIGTERM arrives (the offline message first).
        bob = ChatClient(
            prosody.jid("bob"), prosody.users["bob"], port=guard.tls_port, tls=TlsMode.DIRECT
        )
        await bob.connect()
        got = await bob.next_message()
        assert (got.body, got.delayed) == (body, True)
        gone = asyncio.Event()
        bob.xmpp.add_event_handler("disconnected", lambda _event: gone.set())

        status = await asyncio.to_thread(guard.stop)
        assert status == 0, guard.log_tail()  # exited by itself, not SIGKILLed after grace
        await asyncio.wait_for(gone.wait(), 10)  # and the client's connection ended with it
        assert not port_is_open(guard.host, guard.port)
        assert not port_is_open(guard.host, guard.tls_port)
        log = guard.log_tail(100_000)
        assert "Traceback" not in log, log
        assert body not in log  # never a message body in the logs
        assert prosody.users["alice"] not in log  # never a credential
    finally:
        if bob is not None:
            await bob.disconnect()
        guard.stop()
