"""Decisions in flight: the proxy reads on while earlier batches wait, and forwards in order.

A hook whose answers take different times (a slow spool, a slow rule) must not reorder a
client's stanzas, lose one, or upset XEP-0198 counts when some of them are dropped.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from archive_api.store.records import Direction
from proxy.hook import Decision, SessionInfo
from proxy.stream import Element
from tests.conftest import ProxyFactory
from tests.support.prosody import ProsodyServer
from tests.support.proxy import RecordingHook
from tests.support.rawxmpp import CLIENT_NS, RawXmppClient


@dataclass
class UnevenHook(RecordingHook):
    """Answers after a random delay (seeded), so later batches often finish first."""

    rng: random.Random = field(default_factory=lambda: random.Random(7))
    in_flight: int = 0
    most_in_flight: int = 0

    async def process(
        self, session: SessionInfo, direction: Direction, stanzas: Sequence[Element]
    ) -> Sequence[Decision]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.rng.choice((0.0, 0.001, 0.004, 0.012)))
            return await super().process(session, direction, stanzas)
        finally:
            self.in_flight -= 1


async def test_uneven_decisions_are_forwarded_in_order_with_exact_sm_counts(
    prosody: ProsodyServer, proxy_factory: ProxyFactory
) -> None:
    tag = uuid.uuid4().hex[:8]
    dropped = {f"{tag}-{i}" for i in range(0, 120, 9)}

    def rule(info: SessionInfo, direction: Direction, element: Element) -> Decision | None:
        if direction is Direction.FROM_CLIENT and any(
            f"<body>{body}</body>".encode() in element.data for body in dropped
        ):
            return Decision.drop()
        return None

    hook = UnevenHook([rule])
    running = await proxy_factory(hook)
    sender = RawXmppClient(running.host, running.port, prosody.domain)
    receiver = RawXmppClient(running.host, running.port, prosody.domain)
    try:
        await receiver.login("bob", prosody.users["bob"], resource="rx")
        await receiver.presence()
        await sender.login("carol", prosody.users["carol"], resource="tx")
        await sender.presence()
        sm = await sender.enable_sm()
        assert sm.sm_id
        bodies = [f"{tag}-{i}" for i in range(120)]
        for body in bodies:
            sender.send_message(receiver.jid or "", body)  # one write each: many batches
            if len(body) % 3 == 0:
                await asyncio.sleep(0)
        await sender.drain()
        expected = [b for b in bodies if b not in dropped]
        got = await receiver.messages(len(expected), timeout=30.0)
        body_tag = f"{{{CLIENT_NS}}}body"
        assert [m.findtext(body_tag) for m in got] == expected
        # The server got 120 - len(dropped); the proxy answers for all 120.
        assert await sender.request_ack() == sm.outbound == len(bodies)
        assert hook.most_in_flight > 1, "batches were never in flight together"
    finally:
        await sender.close()
        await receiver.close()
    log = prosody.log_text()
    assert "acknowledged more stanzas" not in log, prosody.diagnostics()
    assert "acknowledged less stanzas" not in log, prosody.diagnostics()


async def test_depth_zero_decides_one_batch_at_a_time(
    prosody: ProsodyServer, proxy_factory: ProxyFactory
) -> None:
    hook = UnevenHook()
    running = await proxy_factory(hook, pipeline_depth=0)
    sender = RawXmppClient(running.host, running.port, prosody.domain)
    receiver = RawXmppClient(running.host, running.port, prosody.domain)
    try:
        await receiver.login("bob", prosody.users["bob"], resource="rx0")
        await receiver.presence()
        await sender.login("carol", prosody.users["carol"], resource="tx0")
        await sender.presence()
        bodies = [f"serial-{i}-{uuid.uuid4().hex[:6]}" for i in range(30)]
        for body in bodies:
            sender.send_message(receiver.jid or "", body)
        await sender.drain()
        got = await receiver.messages(len(bodies), timeout=30.0)
        assert [m.findtext(f"{{{CLIENT_NS}}}body") for m in got] == bodies
        assert hook.most_in_flight == 1
    finally:
        await sender.close()
        await receiver.close()
