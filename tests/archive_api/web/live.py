"""The web UI served by a real uvicorn on a free loopback port, for the browser tests.

`LiveServer` runs one asyncio loop in a thread: it builds `web_env` (real spool, indexer,
quarantine service, API service with the web router), serves the app with
`stanzaguard.api_wiring.ApiServer` (uvicorn on a socket bound to 127.0.0.1:0), and waits
to be stopped. The test, in the main thread, drives a browser at `base_url` and can run
coroutines against the same environment with `call`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from stanzaguard.api_wiring import ApiServer
from tests.archive_api.web.support import WebEnv, web_env

T = TypeVar("T")
START_TIMEOUT = 60.0


class LiveServer:
    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._env: WebEnv | None = None
        self.base_url = ""
        self._thread = threading.Thread(target=self._run, name="web-ui-server", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError("the web UI server did not start in time")
        if self._failure is not None:
            raise RuntimeError("the web UI server failed to start") from self._failure

    @property
    def env(self) -> WebEnv:
        assert self._env is not None
        return self._env

    def call(self, work: Callable[[WebEnv], Coroutine[Any, Any, T]], timeout: float = 30) -> T:
        """Run `work(env)` on the server's loop and return its result."""
        assert self._loop is not None and self._env is not None
        future: Future[T] = asyncio.run_coroutine_threadsafe(work(self._env), self._loop)
        return future.result(timeout)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the starting thread
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # Plain http on loopback is the development set-up: cookies without `Secure`,
        # which browsers would not send back over http (test_pages checks `Secure`).
        async with web_env(self._tmp_path, environment="development") as env:
            server = ApiServer(env.service.app, "127.0.0.1", 0)
            host, port = await server.start()
            self._env = env
            self.base_url = f"http://{host}:{port}"
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await server.stop()
