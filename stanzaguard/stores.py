"""Which archive store to open, and opening it: SQLite (one file) or Elasticsearch.

A store is named by a spec, as the settings give it (`store`, `es_url`, ...) or as commands
take it: `sqlite:PATH` or `es:URL[,URL...]` (the index prefix given beside it). Credentials
for Elasticsearch never travel in a spec or on a command line: they come from the settings,
and a child process (the index worker) gets them as `STANZAGUARD_ES_*` environment variables
set by its parent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from archive_api.store.base import ArchiveStore
from archive_api.store.sqlite import SqliteStore
from stanzaguard.errors import StanzaGuardError
from stanzaguard.settings import ES_INDEX_PREFIX_RE, Settings, check_es_url

SQLITE_SCHEME = "sqlite"
ES_SCHEME = "es"
DEFAULT_ES_INDEX_PREFIX = "stanzaguard"
#: Longest spec accepted on a command line (several node URLs fit easily).
MAX_SPEC_LENGTH = 8192

#: The environment variables a child process reads Elasticsearch credentials from; the same
#: names the settings read, so a parent configured by environment passes them on unchanged.
ENV_ES_API_KEY = "STANZAGUARD_ES_API_KEY"
ENV_ES_USERNAME = "STANZAGUARD_ES_USERNAME"
ENV_ES_PASSWORD = "STANZAGUARD_ES_PASSWORD"  # noqa: S105 (a variable name)
ENV_ES_CA_FILE = "STANZAGUARD_ES_CA_FILE"


class StoreSpecError(StanzaGuardError):
    """A store spec that names no store we can open."""


@dataclass(frozen=True, slots=True)
class EsCredentials:
    api_key: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    ca_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> EsCredentials:
        return cls(
            settings.es_api_key, settings.es_username, settings.es_password, settings.es_ca_file
        )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> EsCredentials:
        api_key = environ.get(ENV_ES_API_KEY) or None
        username = environ.get(ENV_ES_USERNAME) or None
        password = environ.get(ENV_ES_PASSWORD) or None
        ca_file = environ.get(ENV_ES_CA_FILE) or None
        return cls(
            SecretStr(api_key) if api_key else None,
            username,
            SecretStr(password) if password else None,
            Path(ca_file) if ca_file else None,
        )

    def environment(self) -> dict[str, str]:
        """What a child process needs to build these credentials with `from_environment`."""
        env = {}
        if self.api_key is not None:
            env[ENV_ES_API_KEY] = self.api_key.get_secret_value()
        if self.username is not None:
            env[ENV_ES_USERNAME] = self.username
        if self.password is not None:
            env[ENV_ES_PASSWORD] = self.password.get_secret_value()
        if self.ca_file is not None:
            env[ENV_ES_CA_FILE] = str(self.ca_file)
        return env


@dataclass(frozen=True, slots=True)
class SqliteSpec:
    path: Path

    def __str__(self) -> str:
        return f"{SQLITE_SCHEME}:{self.path}"


@dataclass(frozen=True, slots=True)
class EsSpec:
    urls: tuple[str, ...]
    index_prefix: str = DEFAULT_ES_INDEX_PREFIX
    credentials: EsCredentials = field(default_factory=EsCredentials, repr=False, compare=False)

    def __str__(self) -> str:  # never the credentials
        return f"{ES_SCHEME}:{','.join(self.urls)} (index prefix {self.index_prefix})"

    @property
    def location(self) -> str:
        """The spec as a command line gives it (without the prefix)."""
        return f"{ES_SCHEME}:{','.join(self.urls)}"


StoreSpec = SqliteSpec | EsSpec


def parse_store_spec(
    text: str,
    *,
    es_index_prefix: str = DEFAULT_ES_INDEX_PREFIX,
    credentials: EsCredentials | None = None,
) -> StoreSpec:
    """`sqlite:PATH` or `es:URL[,URL...]`; StoreSpecError saying what is wrong otherwise."""
    if len(text) > MAX_SPEC_LENGTH:
        raise StoreSpecError(f"store spec too long (at most {MAX_SPEC_LENGTH} characters)")
    if not text.isprintable():
        raise StoreSpecError("store spec contains control characters")
    scheme, sep, rest = text.partition(":")
    if not sep:
        raise StoreSpecError(f"store spec {text[:80]!r}: give sqlite:PATH or es:URL")
    if scheme == SQLITE_SCHEME:
        if not rest.strip():
            raise StoreSpecError("sqlite: give the archive file's path (sqlite:PATH)")
        return SqliteSpec(Path(rest))
    if scheme == ES_SCHEME:
        urls = [part.strip() for part in rest.split(",") if part.strip()]
        if not urls:
            raise StoreSpecError("es: give the Elasticsearch URL (es:https://HOST:9200)")
        try:
            checked = tuple(check_es_url(url) for url in urls)
        except ValueError as exc:
            raise StoreSpecError(f"es: {exc}") from None
        if not ES_INDEX_PREFIX_RE.fullmatch(es_index_prefix):
            raise StoreSpecError(
                f"index prefix {es_index_prefix[:80]!r}: lower-case letters, digits, '-' or '_' "
                "(at most 61)"
            )
        return EsSpec(checked, es_index_prefix, credentials or EsCredentials())
    raise StoreSpecError(
        f"unknown store scheme {scheme[:40]!r} in {text[:80]!r}: give sqlite:PATH or es:URL"
    )


def spec_from_settings(settings: Settings, sqlite_path: Path) -> StoreSpec:
    """The store the settings choose; `sqlite_path` is where the data directory keeps SQLite's."""
    if settings.store == "elasticsearch":
        return EsSpec(
            tuple(settings.es_url), settings.es_index_prefix, EsCredentials.from_settings(settings)
        )
    return SqliteSpec(sqlite_path)


async def open_store_spec(spec: StoreSpec, *, create: bool = True) -> ArchiveStore:
    """Open the store; with `create=False` a SQLite file that is not there is an error.

    Elasticsearch always creates its templates and first indices when they are missing
    (idempotent); unreachable clusters raise the store's `StoreUnavailable`.
    """
    if isinstance(spec, SqliteSpec):
        if not create and not spec.path.is_file():
            raise StanzaGuardError(f"no archive at {spec.path}")
        if create and not spec.path.parent.is_dir():
            raise StanzaGuardError(f"{spec.path.parent} is not a directory")
        return await SqliteStore.open(spec.path)
    # Imported here: only deployments that choose Elasticsearch load its client.
    from archive_api.store.elasticsearch import ElasticsearchStore

    creds = spec.credentials
    basic_auth = None
    if creds.username is not None and creds.password is not None:
        basic_auth = (creds.username, creds.password.get_secret_value())
    return await ElasticsearchStore.open(
        list(spec.urls),
        index_prefix=spec.index_prefix,
        basic_auth=basic_auth,
        api_key=creds.api_key.get_secret_value() if creds.api_key is not None else None,
        ca_certs=str(creds.ca_file) if creds.ca_file is not None else None,
    )


def worker_arguments(spec: StoreSpec) -> tuple[list[str], dict[str, str]]:
    """The index worker's store arguments and the environment it needs beside its parent's.

    The credentials go in the environment (never argv, which every user of the machine can
    read in the process list).
    """
    if isinstance(spec, SqliteSpec):
        return ["--store", str(spec)], {}
    return (
        ["--store", spec.location, "--es-prefix", spec.index_prefix],
        spec.credentials.environment(),
    )


def worker_environment(extra: Mapping[str, str]) -> dict[str, str] | None:
    """The child's environment: the parent's plus `extra`; None (inherit) when nothing is added."""
    if not extra:
        return None
    return {**os.environ, **extra}
