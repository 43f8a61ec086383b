"""Issue 6: the settings choose the archive store; the service runs on Elasticsearch.

Settings validation of the new fields (URLs, prefix, credentials), store specs as commands and
the index worker take them, and end to end: `ArchivingService` with store=elasticsearch in
front of a real Prosody, a message through the proxy landing in osmem-server through the index
worker process, then `stanzaguard search` and `verify` (the real command) reading it there.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from archive_api.store.elasticsearch import ElasticsearchStore
from archive_api.store.sqlite import SqliteStore
from stanzaguard.errors import SettingsError, StanzaGuardError
from stanzaguard.index_worker import child_store_spec
from stanzaguard.settings import load_settings
from stanzaguard.stores import (
    ENV_ES_API_KEY,
    ENV_ES_PASSWORD,
    EsCredentials,
    EsSpec,
    SqliteSpec,
    StoreSpecError,
    open_store_spec,
    parse_store_spec,
    spec_from_settings,
    worker_arguments,
)
from stanzaguard.wiring import ArchivingService, open_store
from tests.stanzaguard import es_support
from tests.stanzaguard.conftest import ArchivingFactory, receive, run_cli
from tests.stanzaguard.es_support import EsLocation

# The fixtures this module uses (pytest finds them as module attributes).
osmem_server = es_support.osmem_server
es_client = es_support.es_client
es_location = es_support.es_location

# -- settings -----------------------------------------------------------------------------------


def test_default_store_is_sqlite_in_the_data_directory(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    assert settings.store == "sqlite"
    assert spec_from_settings(settings, tmp_path / "archive.sqlite3") == SqliteSpec(
        tmp_path / "archive.sqlite3"
    )


def test_elasticsearch_needs_a_url() -> None:
    with pytest.raises(SettingsError, match="es_url: required with store=elasticsearch"):
        load_settings(store="elasticsearch")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("es.internal:9200", "http:// or https://"),
        ("ftp://es.internal", "http:// or https://"),
        ("javascript:alert(1)", "http:// or https://"),
        ("https://", "no host"),
        ("https://:9200", "no host"),
        ("https://elastic:secret@es.internal:9200", "must not hold credentials"),
        ("https://es.internal:9200/?pretty", "query or fragment"),
        ("https://es.internal:9200#x", "query or fragment"),
        ("https://es.internal:99999", "malformed"),
        ("https://es.internal:port", "malformed"),
        ("https://es.internal:0", "port must be"),
        ("https://es.internal/\x00", "control characters"),
        ("https://es.internal/a b", "spaces"),
        ("https://es.internal/" + "a" * 5000, "too long"),
    ],
)
def test_malformed_es_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(SettingsError, match="es_url") as caught:
        load_settings(store="elasticsearch", es_url=[url])
    assert why in str(caught.value)


def test_es_urls_from_the_environment_are_comma_separated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STANZAGUARD_STORE", "elasticsearch")
    monkeypatch.setenv("STANZAGUARD_ES_URL", "https://a.internal:9200, https://b.internal:9200")
    monkeypatch.setenv("STANZAGUARD_ES_API_KEY", "c2VjcmV0LWtleQ==")
    settings = load_settings()
    assert settings.es_url == ["https://a.internal:9200", "https://b.internal:9200"]
    # The key is a secret: not in the settings' repr, not in the spec's.
    spec = spec_from_settings(settings, Path("unused"))
    assert isinstance(spec, EsSpec)
    assert "c2VjcmV0LWtleQ" not in repr(settings) + repr(spec) + str(spec)
    assert spec.credentials.api_key is not None
    assert spec.credentials.api_key.get_secret_value() == "c2VjcmV0LWtleQ=="


def test_too_many_es_urls_are_refused() -> None:
    urls = [f"https://n{i}.internal:9200" for i in range(65)]
    with pytest.raises(SettingsError, match="at most 64"):
        load_settings(es_url=urls)


@pytest.mark.parametrize("prefix", ["", "Upper", "-lead", "has space", "a" * 62, "dots.in", "é"])
def test_bad_index_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(SettingsError, match="es_index_prefix"):
        load_settings(es_index_prefix=prefix)


def test_credentials_must_be_complete_and_one_kind() -> None:
    url = ["https://es.internal:9200"]
    with pytest.raises(SettingsError, match="give both or neither"):
        load_settings(store="elasticsearch", es_url=url, es_username="stanzaguard")
    with pytest.raises(SettingsError, match="give both or neither"):
        load_settings(store="elasticsearch", es_url=url, es_password="pw")
    with pytest.raises(SettingsError, match="not both"):
        load_settings(
            store="elasticsearch", es_url=url, es_api_key="k", es_username="u", es_password="p"
        )


def test_credentials_over_plain_http_only_in_development() -> None:
    http = ["http://es.internal:9200"]
    with pytest.raises(SettingsError, match="plain http"):
        load_settings(store="elasticsearch", es_url=http, es_api_key="k")
    with pytest.raises(SettingsError, match="plain http"):
        load_settings(store="elasticsearch", es_url=http, es_username="u", es_password="p")
    # Without credentials (a private network), or with TLS, or in development: accepted.
    assert load_settings(store="elasticsearch", es_url=http).es_url == http
    https = ["https://es.internal:9200"]
    assert load_settings(store="elasticsearch", es_url=https, es_api_key="k").es_api_key
    dev = load_settings(
        store="elasticsearch", es_url=http, es_api_key="k", environment="development"
    )
    assert dev.es_api_key == SecretStr("k")


def test_unknown_store_is_refused() -> None:
    with pytest.raises(SettingsError, match="store"):
        load_settings(store="mongodb")


# -- store specs ---------------------------------------------------------------------------------


def test_specs_parse() -> None:
    assert parse_store_spec("sqlite:/srv/a.sqlite3") == SqliteSpec(Path("/srv/a.sqlite3"))
    spec = parse_store_spec("es:https://a:9200,https://b:9200", es_index_prefix="arch")
    assert spec == EsSpec(("https://a:9200", "https://b:9200"), "arch")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("mongodb://x", "unknown store scheme"),
        ("/srv/archive.sqlite3", "give sqlite:PATH or es:URL"),
        ("", "give sqlite:PATH or es:URL"),
        ("sqlite:", "path"),
        ("sqlite:   ", "path"),
        ("es:", "give the Elasticsearch URL"),
        ("es:,,", "give the Elasticsearch URL"),
        ("es:ftp://x", "http:// or https://"),
        ("es:https://u:p@x:9200", "credentials"),
        ("sqlite:/tmp/a\nb", "control characters"),
        ("es:https://x:9200" + "/a" * 5000, "too long"),
    ],
)
def test_bad_specs_say_why(text: str, why: str) -> None:
    with pytest.raises(StoreSpecError, match=why):
        parse_store_spec(text)


def test_bad_prefix_in_a_spec_is_refused() -> None:
    with pytest.raises(StoreSpecError, match="index prefix"):
        parse_store_spec("es:https://x:9200", es_index_prefix="../etc")


def test_the_worker_gets_credentials_in_its_environment_never_argv() -> None:
    creds = EsCredentials(api_key=SecretStr("the-key"), ca_file=Path("/etc/ca.pem"))
    spec = EsSpec(("https://es.internal:9200",), "arch", creds)
    argv, env = worker_arguments(spec)
    assert argv == ["--store", "es:https://es.internal:9200", "--es-prefix", "arch"]
    assert "the-key" not in " ".join(argv)
    assert env[ENV_ES_API_KEY] == "the-key"
    # ...and the child reads them back from there.
    child = child_store_spec(argv[1], argv[3])
    assert isinstance(child, EsSpec)
    assert child == spec
    assert EsCredentials.from_environment(env) == creds
    basic = EsCredentials(username="u", password=SecretStr("pw"))
    assert EsCredentials.from_environment(basic.environment()) == basic
    assert basic.environment()[ENV_ES_PASSWORD] == "pw"


def test_the_worker_still_takes_a_bare_sqlite_path() -> None:
    assert child_store_spec("/srv/archive.sqlite3", None) == SqliteSpec(
        Path("/srv/archive.sqlite3")
    )
    assert child_store_spec("sqlite:/srv/a", None) == SqliteSpec(Path("/srv/a"))
    assert worker_arguments(SqliteSpec(Path("/srv/a")))[0] == ["--store", "sqlite:/srv/a"]
    with pytest.raises(StanzaGuardError, match="http"):
        child_store_spec("es:ftp://x", "p")


# -- opening ------------------------------------------------------------------------------------


async def test_open_store_follows_the_settings(tmp_path: Path, es_location: EsLocation) -> None:
    sqlite = await open_store(load_settings(data_dir=tmp_path))
    try:
        assert isinstance(sqlite, SqliteStore)
        assert (tmp_path / "archive.sqlite3").is_file()
    finally:
        await sqlite.close()
    settings = load_settings(
        data_dir=tmp_path,
        store="elasticsearch",
        es_url=[es_location.url],
        es_index_prefix=es_location.prefix,
    )
    es = await open_store(settings)
    try:
        assert isinstance(es, ElasticsearchStore)
        assert es.index("ledger") == es_location.index("ledger")
        assert await es.last_seq() == 0
    finally:
        await es.close()


async def test_an_existing_sqlite_archive_is_required_when_asked(tmp_path: Path) -> None:
    with pytest.raises(StanzaGuardError, match="no archive at"):
        await open_store_spec(SqliteSpec(tmp_path / "missing.sqlite3"), create=False)
    with pytest.raises(StanzaGuardError, match="not a directory"):
        await open_store_spec(SqliteSpec(tmp_path / "no" / "such" / "a.sqlite3"))


# -- end to end: the service on Elasticsearch ------------------------------------------------


async def test_service_archives_into_elasticsearch_and_the_commands_read_it(
    archiving_factory: ArchivingFactory, es_location: EsLocation, tmp_path: Path
) -> None:
    running = await archiving_factory(
        store="elasticsearch",
        es_url=[es_location.url],
        es_index_prefix=es_location.prefix,
        api_listen="off",
    )
    assert isinstance(running.service.store, ElasticsearchStore)
    alice = running.client("alice")
    bob = running.client("bob")
    await alice.connect()
    await bob.connect()
    alice.send_chat("bob@localhost", "quarterly figures attached, on elasticsearch")
    await receive(bob, "quarterly figures attached, on elasticsearch")
    await running.drain()  # through the index worker process, into osmem-server
    page = await running.service.store.search('"quarterly figures"', limit=10)
    assert [hit.record.body for hit in page.hits] == [
        "quarterly figures attached, on elasticsearch"
    ]
    assert page.hits[0].record.sender == "alice@localhost"
    # Nothing went into a SQLite archive beside it.
    assert not (running.data_dir / "archive.sqlite3").exists()
    await running.stop()

    config = tmp_path / "es.toml"
    config.write_text(
        f'store = "elasticsearch"\nes_url = ["{es_location.url}"]\n'
        f'es_index_prefix = "{es_location.prefix}"\n'
    )
    data_dir = str(running.data_dir)
    found = await asyncio.to_thread(
        run_cli, "search", "--data-dir", data_dir, "--config", str(config), "--json", "quarterly"
    )
    assert found.returncode == 0, found.stdout + found.stderr
    (line,) = found.stdout.splitlines()
    assert json.loads(line)["body"] == "quarterly figures attached, on elasticsearch"
    verified = await asyncio.to_thread(
        run_cli, "verify", "--data-dir", data_dir, "--config", str(config)
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK" in verified.stdout
    assert "0 spooled entries" not in verified.stdout
    # Without the config the command looks for SQLite, and says it is not there.
    missing = await asyncio.to_thread(run_cli, "search", "--data-dir", data_dir, "quarterly")
    assert missing.returncode == 2
    assert "no archive at" in missing.stderr


def test_the_service_takes_elasticsearch_with_the_api_and_retention(tmp_path: Path) -> None:
    """Both run on Elasticsearch now (tests/stanzaguard/test_es_operations.py runs them)."""
    retention = tmp_path / "retention.toml"
    retention.write_text("[retention]\n")
    settings = load_settings(
        store="elasticsearch",
        es_url=["https://es.internal:9200"],
        retention_file=retention,
        api_listen="127.0.0.1:8080",
        domain=["localhost"],
        allow_plaintext=True,
        environment="development",
    )
    service = ArchivingService(settings)
    assert service.settings.retention_file == retention
