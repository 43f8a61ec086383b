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
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

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
