"""Long-lived connections that come back: the one reconnect loop of the proxy's XMPP clients.

The RTBL subscriber (`proxy.rtbl`), the RTBL publisher (`proxy.rtbl_publish`) and the
component link (`proxy.component`) each keep one connection up for as long as the service
runs. They share the shape implemented here once:

- a *session* is one connection, from connecting to its end; it returns or raises when the
  connection is over (`SessionEnded` says why). Whatever it raises, cancellation aside, ends
  that session only, never the loop: the next attempt follows the wait;
- between attempts the loop waits `backoff_delay` (doubling, jittered, capped);
- a session that was up for `STABLE_SESSION_SECONDS` or more resets the backoff, so a
  connection that keeps dropping right after it comes up keeps backing off, while one that
  served for a while and then dropped is retried quickly;
- `ReconnectingTask.stop` cancels the loop wherever it is (in a session or in the wait) and
  returns once it has ended; a session cleans up in its own ``finally`` blocks.

What the owner says about an ended session (its log lines and counters) is its own: it gets
the exception and the coming delay through ``on_session_end``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: A session that lasted this long resets the reconnection backoff.
STABLE_SESSION_SECONDS = 60.0

#: ``on_session_end(error, delay)``: what ended the session, and the wait before the next one.
SessionEndHook = Callable[[Exception, float], None]


def backoff_delay(
    attempt: int,
    initial: float,
    maximum: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Exponential backoff with jitter: ``min(maximum, initial * 2**attempt)``, times 0.5-1."""
    base = min(maximum, initial * 2.0 ** min(attempt, 30))
    return base * (0.5 + rand() / 2)


class SessionEnded(Exception):
    """An XMPP session is over (or never started); the reason is the message.

    Raised by the sessions of the three long-lived XMPP connections (RTBL subscriber, RTBL
    publisher, component) and reported to their owners by `ReconnectingTask`.
    """


class SessionWatch:
    """The two moments of one connection: its session started, and it ended (with a reason).

    slixmpp reports both through event handlers; whichever comes first settles `started`
    (an end before the start makes awaiting `started` raise `SessionEnded`).
    """

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[None] = loop.create_future()
        self.ended: asyncio.Future[str] = loop.create_future()

    def start(self, _event: object = None) -> None:
        if not self.started.done():
            self.started.set_result(None)

    def end(self, reason: str) -> None:
        if not self.started.done():
            self.started.set_exception(SessionEnded(reason))
        if not self.ended.done():
            self.ended.set_result(reason)


class ReconnectingTask:
    """Runs ``session`` over and over in one asyncio task, backing off between attempts.

    ``session`` calls `session_started` once its connection is up (that moment decides
    whether the session counts as stable). ``clock`` is a monotonic clock in seconds.
    """

    def __init__(
        self,
        session: Callable[[], Awaitable[None]],
        *,
        name: str,
        backoff_initial: float,
        backoff_max: float,
        on_session_end: SessionEndHook,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        stable_after: float = STABLE_SESSION_SECONDS,
    ) -> None:
        self._session = session
        self._name = name
        self._initial = backoff_initial
        self._maximum = backoff_max
        self._on_session_end = on_session_end
        self._rand = rand
        self._clock = clock
        self._stable_after = stable_after
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._session_began: float | None = None
        self.attempts = 0  # sessions begun since start, for tests and diagnostics

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Begin the first attempt now (in the background); a second call does nothing."""
        if self.running:
            return
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        """Cancel the current session or wait, and return once the loop has ended."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def session_started(self) -> None:
        """Called by the session once its connection is up."""
        self._session_began = self._clock()

    async def _loop(self) -> None:
        attempt = 0
        while not self._stopping:
            self._session_began = None
            self.attempts += 1
            error: Exception
            try:
                await self._session()
                error = SessionEnded("the session returned")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc
            began = self._session_began
            if began is not None and self._clock() - began >= self._stable_after:
                attempt = 0
            delay = backoff_delay(attempt, self._initial, self._maximum, self._rand)
            attempt += 1
            try:
                self._on_session_end(error, delay)
            except Exception:
                # Reporting must not end the loop that keeps the connection.
                log.exception("reporting an ended session failed", extra={"task": self._name})
            await asyncio.sleep(delay)


__all__ = [
    "STABLE_SESSION_SECONDS",
    "ReconnectingTask",
    "SessionEndHook",
    "SessionEnded",
    "SessionWatch",
    "backoff_delay",
]


class XmppConnection(Protocol):
    """What `close_connection` needs of a slixmpp stream (client or component)."""

    @property
    def transport(self) -> object | None: ...

    def cancel_connection_attempt(self) -> None: ...

    def disconnect(self, wait: float = 2.0) -> Awaitable[Any]: ...

    def abort(self) -> None: ...


async def close_connection(xmpp: XmppConnection) -> None:
    """End a session's stream: stop slixmpp's own reconnecting, close politely (2 s), else
    abort, and let its ``connection_lost`` run before the next attempt."""
    xmpp.cancel_connection_attempt()
    if xmpp.transport is not None:
        try:
            await asyncio.wait_for(xmpp.disconnect(wait=2.0), 3.0)
        except Exception:  # a timeout, or the stream already broken
            xmpp.abort()
    if xmpp.transport is not None:
        xmpp.abort()
    await asyncio.sleep(0)
