"""Settings: built once at start-up from CLI options, `STANZAGUARD_*` variables and a TOML file.

Precedence, highest first: command-line options, environment variables, the TOML file
(`--config FILE` or `STANZAGUARD_CONFIG`), defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from stanzaguard.errors import SettingsError


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port!r}")
    return value


HostPort = Annotated[str, AfterValidator(_host_port)]


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STANZAGUARD_", extra="forbid", validate_default=True
    )

    environment: Literal["development", "production"] = Field(
        "production", description="'development' relaxes checks meant for production."
    )
    # NoDecode: the environment gives lists as comma-separated text (docs/configuration.md),
    # which `_split_domains` splits; without it pydantic-settings insists on JSON there.
    domain: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="XMPP domains served (the `to` of client streams)."
    )
    upstream: HostPort = Field(
        "127.0.0.1:5222", description="The XMPP server's c2s port (loopback, plain TCP)."
    )
    upstream_tls: bool = Field(False, description="Direct TLS to the upstream server.")
    upstream_ca_file: Path | None = Field(None, description="CA bundle for upstream TLS.")
    cert: Path | None = Field(None, description="PEM certificate (chain) for the domain.")
    key: Path | None = Field(None, description="PEM private key for the domain.")
    listen: HostPort | None = Field("0.0.0.0:5222", description="STARTTLS listener.")
    listen_tls: HostPort | None = Field(
        "0.0.0.0:5223", description="Direct TLS listener (XEP-0368)."
    )
    allow_plaintext: bool = Field(
        False, description="Let clients stay unencrypted (never in production)."
    )
    data_dir: Path = Field(Path("stanzaguard-data"), description="Spool, archive and keys.")
    policy: Path | None = Field(None, description="Policy file (TOML), reloaded on change.")
    keep_evidence: bool = Field(
        True, description="Keep sealed spool segments as evidence (else delete once indexed)."
    )
    evidence_dir: Path | None = Field(
        None, description="Where sealed segments go (WORM storage); default DATA_DIR/evidence."
    )
    fail_open: bool = Field(
        False, description="Deliver unarchived when the spool is down (unregulated use only)."
    )
    spool_segment_bytes: int = Field(
        64 * 1024**2, ge=4096, description="Spool segment size; full segments are sealed."
    )
    spool_max_bytes: int = Field(
        8 * 1024**3, ge=1024 * 1024, description="Unindexed spool size at which to fail closed."
    )
    checkpoint_every: int = Field(1000, ge=1, description="Sign the chain head every N entries.")
    retention_file: Path | None = Field(
        None,
        description="TOML file with the [retention] section; set: `stanzaguard run` classifies "
        "new records and purges what is due every `retention_interval` seconds.",
    )
    retention_interval: float = Field(
        3600.0, ge=1.0, description="Seconds between the service's retention rounds."
    )
    retention_purge: bool = Field(
        True,
        description="false: the retention job only classifies and reports (a dry run); purging "
        "is left to `stanzaguard purge`.",
    )
    index_worker: bool = Field(
        True,
        description="Index in a worker process (false: in the proxy's own process, which then "
        "shares its CPU and GIL with indexing).",
    )
    upload_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="HTTP upload (XEP-0363) hosts whose files are fetched."
    )
    attachment_max_bytes: int = Field(
        100 * 1024 * 1024, ge=1, description="Largest attachment file fetched into the archive."
    )
    attachment_timeout: float = Field(
        60.0, gt=0, le=3600, description="Seconds one attachment download may take in all."
    )
    attachment_retries: int = Field(
        3, ge=0, le=20, description="Retries of a failed attachment download (with backoff)."
    )
    attachment_allow_http: bool = Field(
        False, description="Also fetch plain-http upload URLs (environment=development only)."
    )
    max_stanza_bytes: int = Field(256 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_depth: int = Field(32, ge=4, le=1024)
    max_attributes: int = Field(64, ge=4, le=4096)
    auth_timeout: float = Field(60.0, gt=0, description="Seconds to authenticate.")
    idle_timeout: float = Field(600.0, gt=0, description="Seconds without client bytes.")
    stanza_timeout: float = Field(30.0, gt=0, description="Seconds to finish one element.")
    tls_buffer_bytes: int = Field(
        16 * 1024,
        ge=16 * 1024,
        le=256 * 1024,
        description="asyncio's per-connection TLS read buffer (Python's default: 256 KiB).",
    )
    max_sessions: int = Field(50_000, ge=1)
    metrics_listen: HostPort | None = Field(
        None, description="Serve Prometheus metrics on HOST:PORT (/metrics)."
    )
    rtbl_jid: str | None = Field(
        None, description="Account the real-time block list (RTBL) subscriber logs in as."
    )
    rtbl_password: SecretStr | None = Field(None, description="Password of rtbl_jid.")
    rtbl_server: HostPort | None = Field(
        None, description="HOST:PORT of rtbl_jid's server; default: DNS (SRV) of its domain."
    )
    rtbl_tls: Literal["starttls", "direct", "plain"] = Field(
        "starttls", description="TLS to rtbl_server: starttls, direct, plain (development)."
    )
    rtbl_ca_file: Path | None = Field(None, description="CA bundle for the RTBL server's TLS.")
    rtbl_nodes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="RTBL pubsub nodes, [KIND:]SERVICE/NODE (xmppbl.org/spam_source_domains).",
    )
    blocklist_files: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Block-list files, FORMAT:PATH (jabberspam:/etc/stanzaguard/blacklist.txt).",
    )
    model: str = Field(
        "default",
        description=(
            "Text model: 'default' (shipped), a model directory, or 'off'; a version made "
            "active with `stanzaguard model activate` takes precedence."
        ),
    )
    api_listen: HostPort | None = Field(
        "127.0.0.1:8080",
        description="Serve the search, review and audit API (and web UI) on HOST:PORT beside "
        "the proxy in `stanzaguard run`; 'off' for none. `stanzaguard api` serves it alone.",
    )
    session_secret: SecretStr | None = Field(
        None,
        description="Signs the web UI's session cookies; 32+ random characters, required "
        "outside environment=development (archive_api.auth.session_key checks it).",
    )
    session_max_age: float = Field(
        8 * 3600.0, gt=0, le=30 * 86400, description="Seconds a web UI sign-in lasts."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"

    @field_validator("api_listen", mode="before")
    @classmethod
    def _api_off(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("", "off", "none"):
            return None
        return value

    @field_validator("domain", "upload_hosts", mode="before")
    @classmethod
    def _split_domains(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip().lower() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            return [str(part).strip().lower() for part in value]
        return value

    @field_validator("rtbl_nodes", "blocklist_files", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _model_choice(cls, value: Any) -> Any:
        if isinstance(value, Path):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError("give 'default', 'off' or the path of a model directory")
        value = value.strip()
        if not value:
            raise ValueError("give 'default', 'off' or the path of a model directory")
        if value.lower() in ("default", "off"):
            return value.lower()
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("STANZAGUARD_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings, or raise `SettingsError` naming every bad key."""
    given = {key: value for key, value in overrides.items() if value is not None}
    previous = os.environ.get("STANZAGUARD_CONFIG")
    try:
        if config_file is not None:
            if not config_file.is_file():
                raise SettingsError(f"config file {config_file} does not exist")
            os.environ["STANZAGUARD_CONFIG"] = str(config_file)
        return Settings(**given)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"]) or "(settings)"
            problems.append(f"{key}: {error['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
    except (OSError, ValueError) as exc:  # unreadable or malformed TOML
        raise SettingsError(f"cannot read settings: {exc}") from None
    finally:
        if config_file is not None:
            if previous is None:
                os.environ.pop("STANZAGUARD_CONFIG", None)
            else:
                os.environ["STANZAGUARD_CONFIG"] = previous
