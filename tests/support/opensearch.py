"""Search servers for the Elasticsearch store's tests: osmem-server, or a real Elasticsearch.

osmem-server (PyPI) is an in-memory OpenSearch-compatible server: one is started per test
session on a free loopback port and stopped by its PID. It speaks the OpenSearch dialect and
refuses the `compatible-with=9` media types the official 9.x client sends, so
`allow_plain_media_types` switches the client to plain `application/json` (the substitution
the client applies is module state; headers passed to the client are rewritten by it). That
switch is test code only: production talks to a real Elasticsearch, which wants the
compatible-with media types. ES 9 accepts plain `application/json` too, so the switch does
not break a real server used in the same session.

A real Elasticsearch is used in addition whenever `STANZAGUARD_TEST_ES_URL` is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from elasticsearch import AsyncElasticsearch

from tests.support.services import free_port, service_unavailable

ES_URL_ENV = "STANZAGUARD_TEST_ES_URL"

#: What `elasticsearch._*.client._base` substitutes into content types; see module docstring.
PLAIN_MEDIA_TYPE_SUB = r"application/\g<1>"


def allow_plain_media_types() -> None:
    """Make the official client send plain `application/json` (for OpenSearch dialects)."""
    from elasticsearch._async.client import _base as async_base
    from elasticsearch._sync.client import _base as sync_base

    async_base._COMPAT_MIMETYPE_SUB = PLAIN_MEDIA_TYPE_SUB
    sync_base._COMPAT_MIMETYPE_SUB = PLAIN_MEDIA_TYPE_SUB


@dataclass(frozen=True)
class SearchServer:
    name: str  # "osmem" or "elasticsearch"
    url: str


def real_elasticsearch_url() -> str | None:
    return os.environ.get(ES_URL_ENV) or None


def _stop(process: subprocess.Popen[str], grace: float = 5.0) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)
    finally:
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        if process.stdout is not None:
            process.stdout.close()


@contextlib.contextmanager
def running_osmem() -> Iterator[SearchServer]:
    """An osmem-server on a free loopback port; skips (or fails, when services are required)
    if the package is not installed."""
    try:
        import osmem_server  # type: ignore[import-untyped]
    except ImportError:
        service_unavailable("osmem-server is not installed (pip install -e '.[dev]')")
    allow_plain_media_types()
    try:
        server = osmem_server.OsmemServer.start(
            freeze=False, japanese=False, addr=f"127.0.0.1:{free_port()}"
        )
    except osmem_server.OsmemError as exc:
        service_unavailable(f"osmem-server did not start: {exc}")
    process: subprocess.Popen[str] = server.process
    try:
        yield SearchServer("osmem", str(server.url))
    finally:
        _stop(process)


async def drop_prefix(client: AsyncElasticsearch, prefix: str, kinds: Iterable[str]) -> None:
    """Delete a store's indices and templates by name (a real cluster refuses wildcard deletes
    by default)."""
    found = await client.indices.get(index=f"{prefix}-*", allow_no_indices=True)
    if found.body:
        await client.indices.delete(index=",".join(found.body))
    for kind in kinds:
        await client.options(ignore_status=404).indices.delete_index_template(
            name=f"{prefix}-{kind}"
        )


class BulkRefusingProxy:
    """A pass-through HTTP proxy in front of a search server, for the bulk-writing tests.

    It records how many actions each `_bulk` request carried and how many bytes its body had,
    and answers the first `refuse` bulk requests with a 429 for every action (what a cluster
    whose write queue is full answers), without forwarding them.
    """

    def __init__(self, upstream: str, *, refuse: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self.refuse = refuse
        self.bulk_actions: list[int] = []  # actions per forwarded bulk request
        self.bulk_bytes: list[int] = []  # body size per forwarded bulk request
        self.refused = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self._session = aiohttp.ClientSession()
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path.endswith("/_bulk"):
            lines = [line for line in body.split(b"\n") if line.strip()]
            actions = [json.loads(line) for line in lines[::2]]
            if self.refused < self.refuse:
                self.refused += 1
                items = [
                    {
                        op: {
                            "_index": meta.get("_index", "x"),
                            "_id": meta.get("_id"),
                            "status": 429,
                            "error": {
                                "type": "es_rejected_execution_exception",
                                "reason": "rejected execution (queue capacity reached)",
                            },
                        }
                    }
                    for action in actions
                    for op, meta in action.items()
                ]
                return web.json_response(
                    {"took": 0, "errors": True, "items": items},
                    headers={"X-Elastic-Product": "Elasticsearch"},  # the client checks it
                )
            self.bulk_actions.append(len(actions))
            self.bulk_bytes.append(len(body))
        assert self._session is not None
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body
        ) as upstream:
            data = await upstream.read()
            kept = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower() in ("content-type", "x-elastic-product")
            }
            return web.Response(status=upstream.status, body=data, headers=kept)
