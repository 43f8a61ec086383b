"""Fixtures for the store tests: the search servers the Elasticsearch store runs against."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.opensearch import (
    ES_URL_ENV,
    SearchServer,
    allow_plain_media_types,
    real_elasticsearch_url,
    running_osmem,
)


@pytest.fixture(scope="session")
def osmem_search_server() -> Iterator[SearchServer]:
    """One osmem-server for the whole session (each test uses its own index prefix)."""
    with running_osmem() as server:
        yield server


@pytest.fixture(params=["osmem", "elasticsearch"])
def search_server(request: pytest.FixtureRequest) -> SearchServer:
    """Each Elasticsearch-store test runs on osmem-server and, when configured, on a real
    Elasticsearch."""
    if request.param == "osmem":
        server: SearchServer = request.getfixturevalue("osmem_search_server")
        return server
    url = real_elasticsearch_url()
    if url is None:
        pytest.skip(f"set {ES_URL_ENV} to also run these tests on a real Elasticsearch")
    allow_plain_media_types()  # harmless on ES 9; osmem in the same session needs it
    return SearchServer("elasticsearch", url)
