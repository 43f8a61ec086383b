# mypy: disallow-untyped-calls=False
# (slixmpp's pubsub plugin API is untyped; this helper drives it directly.)
"""A test Prosody that hosts real-time block lists, and a publisher for them.

The ``prosody`` servers built with :func:`rtbl_prosody_config` let the account
``rtbladmin@localhost`` own nodes on ``pubsub.localhost`` (Prosody's ``mod_pubsub`` makes
server admins node owners; only owners may create nodes), and declare a second host,
``remote.localhost``, whose users play senders from another server: the test Prosody has no
s2s, and a policy that lists only ``localhost`` as local treats ``remote.localhost`` as remote.
"""

from __future__ import annotations

import asyncio
import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Callable

from slixmpp.plugins.xep_0004 import Form

from tests.support.clients import ChatClient, TlsMode
from tests.support.prosody import DEFAULT_USERS, ProsodyConfig, ProsodyServer

RTBL_ADMIN = "rtbladmin"
RTBL_USER = "rtbl"
REMOTE = "remote.localhost"
RTBL_USERS = {
    **DEFAULT_USERS,
    RTBL_ADMIN: "rtbladmin-secret",
    RTBL_USER: "rtbl-subscriber-secret",
}
DOMAINS_NODE = "spam_source_domains"
JIDS_NODE = "spam_source_jids_sha256"
TIMEOUT = 10.0


def rtbl_prosody_config() -> ProsodyConfig:
    return ProsodyConfig(
        extra_global=f'admins = {{ "{RTBL_ADMIN}@localhost" }}',
        extra_config=f'VirtualHost "{REMOTE}"',
    )


def jid_sha256(jid: str) -> str:
    """What xmppbl.org and Prosody's mod_anti_spam publish for a JID: hex SHA-256 of it."""
    return hashlib.sha256(jid.encode()).hexdigest()


class Publisher:
    """The list operator: creates nodes on the pubsub service, publishes and retracts ids."""

    def __init__(self, server: ProsodyServer) -> None:
        self.service = server.pubsub_domain
        self.client = ChatClient(
            server.jid(RTBL_ADMIN),
            server.users[RTBL_ADMIN],
            host=server.host,
            port=server.c2s_port,
            tls=TlsMode.PLAIN,
            plugins=("xep_0060",),
            initial_presence=False,
        )

    async def connect(self) -> None:
        await self.client.connect()

    async def disconnect(self) -> None:
        await self.client.disconnect()

    async def create(self, node: str) -> None:
        config = Form()
        config["type"] = "submit"
        config.add_field(var="pubsub#max_items", value="max")  # Prosody keeps 20 by default
        await self.client.xmpp.plugin["xep_0060"].create_node(
            self.service, node, config=config, timeout=TIMEOUT
        )

    async def publish(self, node: str, item_id: str) -> None:
        # Prosody wants one payload element; xmppbl.org and mod_muc_rtbl suggest a XEP-0377
        # report. Subscribers only read the item id.
        report = ET.Element("{urn:xmpp:reporting:1}report", reason="urn:xmpp:reporting:spam")
        await self.client.xmpp.plugin["xep_0060"].publish(
            self.service, node, id=item_id, payload=report, timeout=TIMEOUT
        )

    async def retract(self, node: str, item_id: str) -> None:
        # notify: Prosody only tells subscribers about a retraction when asked to.
        await self.client.xmpp.plugin["xep_0060"].retract(
            self.service, node, item_id, notify=True, timeout=TIMEOUT
        )

    async def purge(self, node: str) -> None:
        await self.client.xmpp.plugin["xep_0060"].purge(self.service, node, timeout=TIMEOUT)


async def eventually(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``check`` until true (a generous wait, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)
