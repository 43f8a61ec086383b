"""XEP-0198 counter translation across drops, injections, wrap-around and resumption."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from classifier.clock import ManualClock
from proxy.sm import MODULUS, DirectionLedger, SmRegistry


def test_plain_forwarding_translates_identically() -> None:
    ledger = DirectionLedger()
    for _ in range(5):
        ledger.forwarded()
    assert ledger.translate(3) == 3
    assert ledger.acknowledge(5) == 5


def test_a_dropped_stanza_is_acknowledged_with_the_stanza_before_it() -> None:
    ledger = DirectionLedger()
    ledger.forwarded()  # source 1 -> sink 1
    ledger.dropped()  # source 2 never reaches the sink
    ledger.forwarded()  # source 3 -> sink 2
    assert ledger.translate(1) == 2
    assert ledger.translate(2) == 3


def test_injections_are_never_acknowledged_to_the_source() -> None:
    ledger = DirectionLedger()
    ledger.forwarded()  # sink 1 = source 1
    ledger.injected(b"<message/>")  # sink 2 = proxy's own
    ledger.forwarded()  # sink 3 = source 2
    assert ledger.translate(2) == 1
    assert ledger.acknowledge(3) == 2
    assert not ledger.unacked_injections


def test_resumption_resends_unacknowledged_injections_and_continues() -> None:
    ledger = DirectionLedger()
    ledger.forwarded()
    ledger.injected(b"<message id='inj'/>")
    ledger.forwarded()
    source_h, pending = ledger.restart_at(1)
    assert source_h == 1
    assert pending == [b"<message id='inj'/>"]
    ledger.forwarded()  # server resends its stanza 2, client counts it as 2
    assert ledger.translate(2) == 2


def test_wrap_around_modulo_two_to_the_32() -> None:
    ledger = DirectionLedger(source_count=MODULUS - 2, sink_count=MODULUS - 2)
    ledger.forwarded()
    ledger.dropped()
    ledger.forwarded()
    ledger.forwarded()
    assert ledger.translate(1) == 2  # sink wrapped to 1 while the source is at 2


@given(st.lists(st.sampled_from(["fwd", "drop", "inject"]), max_size=200))
def test_translation_never_exceeds_what_the_source_sent(ops: list[str]) -> None:
    ledger = DirectionLedger()
    for op in ops:
        if op == "fwd":
            ledger.forwarded()
        elif op == "drop":
            ledger.dropped()
        else:
            ledger.injected(b"x")
    for h in range(ledger.sink_count + 1):
        assert 0 <= ledger.translate(h) <= ledger.source_count
    # Once the sink acks all it got, everything the source sent is acknowledged: drops at the
    # very end ride along with the last delivered stanza.
    assert ledger.translate(ledger.sink_count) == ledger.source_count


def test_registry_evicts_the_least_recently_used() -> None:
    registry = SmRegistry(max_entries=2)
    registry.create("a")
    registry.create("b")
    registry.get("a")
    registry.create("c")
    assert registry.get("b") is None and registry.get("a") is not None


async def test_a_detached_state_is_forgotten_after_the_resumption_timeout() -> None:
    clock = ManualClock()
    registry = SmRegistry(ttl=600.0, monotonic=clock.monotonic)
    live = registry.create("live")
    ended = registry.create("ended")
    await registry.save(live)
    await registry.save(ended, detached=True)  # its connection is gone
    clock.advance(599.0)
    assert await registry.fetch("ended") is ended  # still resumable...
    await registry.save(ended, detached=True)  # ...and that resumption broke off again
    clock.advance(599.0)
    registry.create("newcomer")  # creating sweeps what expired (none yet)
    assert len(registry) == 3
    clock.advance(2.0)
    registry.create("late")  # the sweep forgets "ended": 601 s after its last write
    assert len(registry) == 3
    assert await registry.fetch("ended") is None
    clock.advance(10 * 86_400.0)
    assert await registry.fetch("live") is live  # a live connection's state never expires


async def test_an_expired_state_is_refused_even_before_a_sweep() -> None:
    clock = ManualClock()
    registry = SmRegistry(ttl=5.0, monotonic=clock.monotonic)
    state = registry.create("s")
    await registry.save(state, detached=True)
    clock.advance(5.0)
    assert await registry.fetch("s") is None
    assert len(registry) == 0


async def test_without_a_ttl_detached_states_stay_until_evicted() -> None:
    clock = ManualClock()
    registry = SmRegistry(max_entries=2, monotonic=clock.monotonic)
    state = registry.create("s")
    await registry.save(state, detached=True)
    clock.advance(10 * 86_400.0)
    assert await registry.fetch("s") is state
