"""Hostile input, generated: the query parser (hypothesis) and every operation of the OpenAPI
document (schemathesis, in-process over ASGI). No input may give a 5xx; every error is JSON
with an `error` word and a `detail` message."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote_from_bytes

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from archive_api.auth import Role
from archive_api.store.errors import QuerySyntaxError
from archive_api.store.query import MAX_QUERY_LENGTH, parse_query
from tests.archive_api.api_support import ApiEnv, api_env

# Words of the language, so generated text reaches deep into the parser, not just its first
# error: fields, quotes, negation, wildcards, JIDs and dates, glued with random text.
_PIECES = st.sampled_from(
    [
        "from:",
        "to:",
        "with:",
        "room:",
        "after:",
        "before:",
        "type:",
        "verdict:",
        "has:",
        "is:",
        '"',
        "-",
        "*",
        "*@",
        "@",
        "/",
        ":",
        " ",
        "alice@corp.example",
        "2026-01-01",
        "2026-01-01T10:00:00+02:00",
        "chat",
        "quarantine",
        "attachment",
        "edited",
        "x",
        "é",
        "\t",
        "\x00",
        "\ud800",
        "…",
        "9999-12-31T23:59:59-23:59",
    ]
)
_QUERIES = st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=30).map("".join)


@settings(max_examples=400, deadline=None)
@given(_QUERIES)
def test_parse_query_raises_nothing_but_query_syntax_errors(text: str) -> None:
    try:
        query = parse_query(text)
    except QuerySyntaxError as exc:
        assert 0 <= exc.position <= max(len(text), MAX_QUERY_LENGTH)
        assert exc.message
        return
    # What parses has a canonical form that parses back to the same query.
    assert parse_query(str(query)) == query


@settings(
    max_examples=60,
    deadline=None,
    # The API is not changed by searching, so one served instance for every input is right.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(text=_QUERIES)
def test_search_answers_any_query_with_200_or_a_400_naming_a_position(
    served: ApiEnv, text: str
) -> None:
    # Percent-encoded by hand: a lone surrogate goes out as the invalid UTF-8 it would be.
    encoded = quote_from_bytes(text.encode("utf-8", "surrogatepass"), safe="")
    response = served_call(served, "GET", f"/api/v1/search?q={encoded}")
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        body = response.json()
        assert body["error"] == "query-syntax" and isinstance(body["position"], int)


# --- the whole OpenAPI document -------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ApiEnv]:
    """The API on a real store, set up on its own event loop (schemathesis calls the app from
    its own loop thread; the store and audit log work from any loop)."""
    runner = asyncio.Runner()
    context = api_env(tmp_path)
    env = runner.run(context.__aenter__())
    try:
        yield env
    finally:
        runner.run(context.__aexit__(None, None, None))
        runner.close()


def served_call(env: ApiEnv, method: str, path: str, **kwargs: Any) -> Any:
    """A request through the same in-process client schemathesis uses."""
    from schemathesis.python import asgi

    with asgi.get_client(cast(Any, env.service.app)) as client:
        return client.request(
            method, f"http://{asgi.HOST}{path}", headers=env.auth(Role.OFFICER), **kwargs
        )


EXCLUDED = {("POST", "/api/v1/exports")}
"""Starting an export leaves a background job on schemathesis' loop thread; its own tests
cover it (test_app_changes.py)."""


def fuzz_operation(operation: Any, mode: Any, headers: dict[str, str]) -> None:
    """Generated calls of one operation: below 500, and every error a JSON error body."""

    @settings(
        max_examples=6,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        case.headers = {**(case.headers or {}), **headers}
        response = case.call()
        label = (case.method, case.formatted_path, response.text[:300])
        assert response.status_code < 500, label
        if response.status_code >= 400:
            (content_type,) = response.headers["content-type"]
            assert content_type.startswith("application/json"), label
            body = response.json()
            assert isinstance(body["error"], str), label
            assert isinstance(body["detail"], str), label

    check()


def test_no_operation_answers_5xx_and_every_error_is_json(served: ApiEnv) -> None:
    """Every operation of /openapi.json with data that fits its schema and data that does
    not (schemathesis' two generation modes). Driven per operation rather than through
    schemathesis' pytest plugin, which does not load under this pytest."""
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", served.service.app)
    operations = [cast(Any, result).ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25
    called: set[tuple[str, str]] = set()
    for operation in operations:
        key = (operation.method.upper(), operation.path)
        if key in EXCLUDED:
            continue
        role = Role.AUDITOR if operation.path == "/api/v1/audit" else Role.ADMIN
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz_operation(operation, mode, served.auth(role))
            except Unsatisfiable:
                # Nothing of the operation can be made invalid (it takes no parameters).
                assert mode is GenerationMode.NEGATIVE, key
        called.add(key)
    assert ("GET", "/api/v1/search") in called and ("PUT", "/api/v1/policy") in called
