"""The reconnect loop the RTBL subscriber, the RTBL publisher and the component link share.

Sessions here are scripted coroutines and the clock is a counter the sessions move, so what
is checked is the loop's arithmetic and its stopping, not how long anything took. The real
connections (and the logs they write through this loop) are covered by tests/proxy/test_rtbl.py,
tests/proxy/test_rtbl_publish.py and tests/stanzaguard/test_component_e2e.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from proxy.reconnect import (
    STABLE_SESSION_SECONDS,
    ReconnectingTask,
    SessionEnded,
    SessionWatch,
    backoff_delay,
)

#: Small real delays: the loop really sleeps, so keep the waits short.
UNIT = 1 / 1024  # a power of two: the delays divide back into exact whole numbers
#: A safety net for waits that would hang if the loop were broken; never asserted on.
DEADLINE = 10.0

Session = Callable[["Harness"], Awaitable[None]]


class FakeClock:
    """Monotonic seconds that move only when a scripted session says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A `ReconnectingTask` whose sessions follow a script; the ends it reports, recorded."""

    def __init__(
        self,
        script: list[Session],
        *,
        initial: float = UNIT,
        maximum: float = 8 * UNIT,
        failing_hook: bool = False,
    ) -> None:
        self.script = list(script)
        self.clock = FakeClock()
        self.ended: list[tuple[Exception, float]] = []
        self.failing_hook = failing_hook
        self.idle = asyncio.Event()  # set once the script has run out
        self.task = ReconnectingTask(
            self._session,
            name="test-reconnect",
            backoff_initial=initial,
            backoff_max=maximum,
            on_session_end=self._on_end,
            rand=lambda: 1.0,  # no jitter: the delay is exactly the doubled base
            clock=self.clock,
        )

    async def _session(self) -> None:
        if not self.script:
            self.idle.set()
            await asyncio.Event().wait()  # stay connected until stopped
        await self.script.pop(0)(self)

    def _on_end(self, error: Exception, delay: float) -> None:
        self.ended.append((error, delay))
        if self.failing_hook:
            raise RuntimeError("the owner's logging broke")

    @property
    def delays(self) -> list[float]:
        return [delay / UNIT for _error, delay in self.ended]

    async def run_script(self) -> None:
        """Start, wait until every scripted session has ended, leave it in the last one."""
        self.task.start()
        await asyncio.wait_for(self.idle.wait(), DEADLINE)


async def drops_at_once(_h: Harness) -> None:
    raise SessionEnded("connection refused")


def lasts(seconds: float) -> Session:
    async def session(h: Harness) -> None:
        h.task.session_started()
        h.clock.now += seconds
        raise SessionEnded(f"disconnected after {seconds}s")

    return session


def fails_before_start_after(seconds: float) -> Session:
    async def session(h: Harness) -> None:
        h.clock.now += seconds  # a slow connect that never got a session
        raise SessionEnded("no session")

    return session


async def until(condition: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not condition():
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0)


# --- backoff ----------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_maximum_with_jitter_between_half_and_all() -> None:
    assert [backoff_delay(a, 1.0, 60.0, lambda: 1.0) for a in range(8)] == [
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        32.0,
        60.0,
        60.0,
    ]
    assert backoff_delay(3, 1.0, 60.0, lambda: 0.0) == 4.0
    # An attempt count no float could raise 2 to still gives the maximum.
    assert backoff_delay(10**9, 1.0, 300.0, lambda: 1.0) == 300.0


async def test_sessions_that_drop_at_once_back_off_doubling_to_the_cap() -> None:
    h = Harness([drops_at_once] * 6)
    await h.run_script()
    await h.task.stop()
    assert h.delays == [1, 2, 4, 8, 8, 8]
    assert all(isinstance(error, SessionEnded) for error, _ in h.ended)
    assert h.task.attempts == 7  # six scripted sessions and the one left running


async def test_a_session_that_lasted_resets_the_backoff() -> None:
    h = Harness([drops_at_once] * 3 + [lasts(STABLE_SESSION_SECONDS), drops_at_once])
    await h.run_script()
    await h.task.stop()
    # 1, 2, 4 while dropping; the stable session ends with the first delay again, then 2.
    assert h.delays == [1, 2, 4, 1, 2]


async def test_a_session_shorter_than_stable_keeps_backing_off() -> None:
    h = Harness([drops_at_once] * 2 + [lasts(STABLE_SESSION_SECONDS - 0.5), drops_at_once])
    await h.run_script()
    await h.task.stop()
    assert h.delays == [1, 2, 4, 8]


async def test_a_slow_attempt_that_never_started_a_session_does_not_reset() -> None:
    h = Harness([drops_at_once] * 2 + [fails_before_start_after(10 * STABLE_SESSION_SECONDS)])
    await h.run_script()
    await h.task.stop()
    assert h.delays == [1, 2, 4]


# --- errors -----------------------------------------------------------------------------------


async def test_an_exception_in_a_session_does_not_end_the_loop() -> None:
    async def breaks(_h: Harness) -> None:
        raise RuntimeError("a bug in the session")

    async def bad_value(_h: Harness) -> None:
        raise ValueError("a malformed answer")

    async def returns(_h: Harness) -> None:
        return None

    h = Harness([breaks, bad_value, returns])
    await h.run_script()
    assert h.task.running  # the fourth session is up
    await h.task.stop()
    errors = [error for error, _ in h.ended]
    assert isinstance(errors[0], RuntimeError) and str(errors[0]) == "a bug in the session"
    assert isinstance(errors[1], ValueError)
    # A session that returns is an ended connection too, and is retried like one.
    assert isinstance(errors[2], SessionEnded)
    assert h.delays == [1, 2, 4]


async def test_an_owner_hook_that_raises_does_not_end_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness([drops_at_once] * 2, failing_hook=True)
    await h.run_script()
    assert h.task.running
    await h.task.stop()
    assert h.delays == [1, 2]
    assert "reporting an ended session failed" in caplog.text


# --- stopping ---------------------------------------------------------------------------------


async def test_stop_during_the_wait_between_attempts() -> None:
    h = Harness([drops_at_once], initial=3600.0, maximum=3600.0)
    h.task.start()
    await until(lambda: len(h.ended) == 1)  # now sleeping for an hour
    await asyncio.wait_for(h.task.stop(), DEADLINE)
    assert not h.task.running
    assert h.task.attempts == 1  # no further attempt was made


async def test_stop_during_a_session_cancels_it_and_lets_it_clean_up() -> None:
    entered = asyncio.Event()
    seen: list[str] = []

    async def serving(_h: Harness) -> None:
        try:
            entered.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("cleaned up")

    h = Harness([serving])
    h.task.start()
    await asyncio.wait_for(entered.wait(), DEADLINE)
    await asyncio.wait_for(h.task.stop(), DEADLINE)
    assert seen == ["cancelled", "cleaned up"]
    assert h.ended == []  # a stop is not an ended session: nothing to report or back off
    assert not h.task.running


async def test_start_twice_runs_one_loop_and_stop_is_safe_to_repeat() -> None:
    h = Harness([])
    await h.task.stop()  # before any start: nothing to do
    h.task.start()
    h.task.start()
    await asyncio.wait_for(h.idle.wait(), DEADLINE)
    await asyncio.sleep(0)
    assert h.task.attempts == 1
    await h.task.stop()
    await h.task.stop()
    assert not h.task.running


async def test_a_stopped_task_can_be_started_again_with_a_fresh_backoff() -> None:
    h = Harness([drops_at_once] * 3)
    await h.run_script()
    await h.task.stop()
    h.idle.clear()
    h.script = [drops_at_once]
    await h.run_script()
    await h.task.stop()
    assert h.delays == [1, 2, 4, 1]


# --- SessionWatch -----------------------------------------------------------------------------


async def test_an_end_before_the_start_fails_the_start_with_the_reason() -> None:
    watch = SessionWatch()
    watch.end("authentication failed")
    watch.start()  # too late: ignored
    with pytest.raises(SessionEnded, match="authentication failed"):
        await watch.started
    assert await watch.ended == "authentication failed"


async def test_the_first_end_is_the_reason() -> None:
    watch = SessionWatch()
    watch.start()
    watch.end("disconnected")
    watch.end("stream error")
    await watch.started
    assert await watch.ended == "disconnected"
