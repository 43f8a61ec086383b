"""The event loop the long-running services run on (the `event_loop` setting).

uvloop (libuv) costs the proxy a little less CPU per stanza than the standard library's
loop on the same traffic, and a little more memory per idle TLS connection
(docs/benchmarks.md); the standard loop stays available for deployments that weigh those
the other way, and for debugging tools that need it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from stanzaguard.errors import StanzaGuardError

EventLoopName = Literal["uvloop", "asyncio"]

T = TypeVar("T")


def loop_factory(name: EventLoopName) -> Callable[[], asyncio.AbstractEventLoop]:
    """The constructor of the named loop; a missing uvloop is a clear start-up error."""
    if name == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError as exc:
        raise StanzaGuardError(
            "event_loop = 'uvloop' but uvloop is not installed; install it or set "
            "event_loop = 'asyncio'"
        ) from exc
    return uvloop.new_event_loop


def running_loop_name() -> str:
    """What the running loop is: "uvloop", "asyncio" (or another library's name)."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


def run_on(name: EventLoopName, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new loop of the named kind, as `asyncio.run` does."""
    try:
        factory = loop_factory(name)
    except StanzaGuardError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
