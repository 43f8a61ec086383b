"""Fixtures for the stanzaguard tests that run the service and commands on Elasticsearch.

One osmem-server per session (tests/support/opensearch.py); every test gets its own index
prefix, whose indices and templates are deleted afterwards. Test modules import the fixtures
they use from here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from elasticsearch import Elasticsearch

from archive_api.store.elasticsearch import INDEX_KINDS
from tests.support.es_subprocess import osmem_python_path
from tests.support.opensearch import SearchServer, running_osmem


@dataclass(frozen=True)
class EsLocation:
    url: str
    prefix: str

    @property
    def spec(self) -> str:
        return f"es:{self.url}"

    def index(self, kind: str) -> str:
        return f"{self.prefix}-{kind}"


def drop_prefix(client: Elasticsearch, prefix: str) -> None:
    """Delete every index and index template the store made under `prefix` (by name: a real
    cluster refuses wildcard deletes by default), and its rollover policy where there is ILM."""
    found = client.indices.get(index=f"{prefix}-*", allow_no_indices=True)
    if found.body:
        client.indices.delete(index=",".join(found.body))
    for kind in INDEX_KINDS:
        client.options(ignore_status=404).indices.delete_index_template(name=f"{prefix}-{kind}")
    # Servers without ILM (osmem-server, OpenSearch) answer 400/404/405: nothing to delete.
    client.options(ignore_status=(400, 404, 405)).ilm.delete_lifecycle(name=f"{prefix}-rollover")


@pytest.fixture(scope="session")
def osmem_server() -> Iterator[SearchServer]:
    with running_osmem() as server:
        yield server


@pytest.fixture
def es_client(osmem_server: SearchServer) -> Iterator[Elasticsearch]:
    """A raw (sync) client, for reaching around the store: tampering, cleanup."""
    client = Elasticsearch(osmem_server.url)
    yield client
    client.close()


@pytest.fixture
def es_location(
    osmem_server: SearchServer, es_client: Elasticsearch, monkeypatch: pytest.MonkeyPatch
) -> Iterator[EsLocation]:
    """A fresh index prefix on osmem-server; child processes started by the test (the CLI,
    the index worker) get the test-only media-type switch through PYTHONPATH."""
    monkeypatch.setenv("PYTHONPATH", osmem_python_path())
    location = EsLocation(osmem_server.url, f"sgtest-{uuid.uuid4().hex[:12]}")
    yield location
    drop_prefix(es_client, location.prefix)
