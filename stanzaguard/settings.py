"""Settings: built once at start-up from CLI options, `STANZAGUARD_*` variables and a TOML file.

Precedence, highest first: command-line options, environment variables, the TOML file
(`--config FILE` or `STANZAGUARD_CONFIG`), defaults.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from archive_api.store.audit import AUDIT_CHAIN
from stanzaguard.errors import SettingsError
from stanzaguard.event_loop import EventLoopName


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


# -- the archive store's location (stanzaguard/stores.py opens it) --

#: Longest Elasticsearch node URL accepted (a URL is a host, a port and maybe a path).
MAX_ES_URL_LENGTH = 2048
#: What `ElasticsearchStore.open` accepts as an index prefix (its own check, repeated here so
#: a bad prefix is a settings error at start-up rather than a store error later).
ES_INDEX_PREFIX_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,60}")
#: A proxy's hash chain name: a StatefulSet pod name (a DNS label) fits, and so does the
#: default `spool`. ASCII only, so two names that look alike are alike.
CHAIN_NAME_RE = re.compile(r"[a-z0-9._-]{1,63}")


def check_es_url(value: str) -> str:
    """An Elasticsearch node URL, `http(s)://HOST[:PORT][/PATH]`, or ValueError saying why not.

    Credentials never go in the URL (it is logged and passed on command lines); a query or
    fragment would be ignored by the client, so they are refused rather than silently dropped.
    """
    from urllib.parse import urlsplit

    if len(value) > MAX_ES_URL_LENGTH:
        raise ValueError(f"Elasticsearch URL too long (at most {MAX_ES_URL_LENGTH} characters)")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError("Elasticsearch URL contains spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"malformed Elasticsearch URL {value[:80]!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"Elasticsearch URL must start with http:// or https://, got {value[:80]!r}"
        )
    if not parts.hostname:
        raise ValueError(f"Elasticsearch URL has no host: {value[:80]!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "Elasticsearch URL must not hold credentials (use es_api_key or es_username)"
        )
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise ValueError(f"Elasticsearch URL must not have a query or fragment: {value[:80]!r}")
    if port == 0:
        raise ValueError("Elasticsearch URL port must be 1 to 65535")
    return value


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
    # Web clients (docs/integrations/web-clients.md): the same sessions as TCP clients.
    listen_websocket: HostPort | None = Field(
        None, description="WebSocket (RFC 7395) listener, path /xmpp-websocket; 'off' for none."
    )
    listen_bosh: HostPort | None = Field(
        None, description="BOSH (XEP-0206) listener, path /http-bind; 'off' for none."
    )
    web_tls: bool = Field(
        True,
        description="Serve the WebSocket and BOSH listeners over TLS with cert/key; false only "
        "behind a reverse proxy that terminates TLS (then listen on loopback).",
    )
    bosh_max_wait: int = Field(
        60, ge=1, le=300, description="BOSH: longest a request is held (seconds)."
    )
    bosh_inactivity: int = Field(
        60, ge=5, le=3600, description="BOSH: a session with no request this long ends (seconds)."
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
    ibb_archive_max_bytes: int = Field(
        10 * 1024**2,
        ge=0,
        le=2**40,
        description="In-band bytestream (XEP-0047) bytes archived per transfer; later blocks "
        "keep only their size and SHA-256 (docs/calls-and-files.md).",
    )
    spool_segment_bytes: int = Field(
        64 * 1024**2, ge=4096, description="Spool segment size; full segments are sealed."
    )
    spool_max_bytes: int = Field(
        8 * 1024**3, ge=1024 * 1024, description="Unindexed spool size at which to fail closed."
    )
    checkpoint_every: int = Field(1000, ge=1, description="Sign the chain head every N entries.")
    chain_name: str = Field(
        "spool",
        description="This proxy's hash chain in the store; one name per proxy sharing a store "
        "(lower-case letters, digits, '-', '_', '.'; 1 to 63).",
    )
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
    store: Literal["sqlite", "elasticsearch"] = Field(
        "sqlite",
        description="Archive store: 'sqlite' (DATA_DIR/archive.sqlite3) or 'elasticsearch' "
        "(es_url; docs/elasticsearch.md).",
    )
    es_url: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Elasticsearch node URL(s), http(s)://HOST:PORT, comma-separated.",
    )
    es_index_prefix: str = Field(
        "stanzaguard",
        description="Prefix of the store's indices and templates (lower-case letters, digits, "
        "'-', '_').",
    )
    es_api_key: SecretStr | None = Field(None, description="Elasticsearch API key (encoded).")
    es_username: str | None = Field(None, description="Elasticsearch user (with es_password).")
    es_password: SecretStr | None = Field(None, description="Password of es_username.")
    es_ca_file: Path | None = Field(None, description="CA bundle for Elasticsearch's TLS.")
    index_worker: bool = Field(
        True,
        description="Index in a worker process (false: in the proxy's own process, which then "
        "shares its CPU and GIL with indexing).",
    )
    event_loop: EventLoopName = Field(
        "uvloop",
        description="Event loop of `run`, `component` and `api`: 'uvloop' (libuv, a little "
        "less CPU per stanza) or 'asyncio' (the standard library's; less memory per idle TLS "
        "connection).",
    )
    index_worker_priority: Literal["idle", "low"] = Field(
        "idle",
        description="CPU priority of the index worker: 'idle' (SCHED_IDLE: only CPU time "
        "nothing else wants, so indexing never delays a stanza) or 'low' (nice 5).",
    )
    index_worker_batch_interval: float = Field(
        1.0,
        ge=0.0,
        le=60.0,
        description="Seconds new spool entries gather before the index worker is told of "
        "them, so that one transaction indexes them all (search lags traffic by up to this).",
    )
    index_worker_boost_backlog: int = Field(
        200_000,
        ge=1,
        description="Unindexed spool entries at which an 'idle' index worker is replaced by a "
        "'low' one until the backlog is down to a tenth of this.",
    )
    # -- distributed mode (docs/distributed.md) --
    indexing: Literal["process", "celery"] = Field(
        "process",
        description="'process': this machine indexes (index_worker); 'celery': spool batches "
        "go to `stanzaguard worker` processes over Redis (redis_url).",
    )
    counters: Literal["memory", "redis"] = Field(
        "memory",
        description="Where rate and fan-out counters live: 'memory' (this proxy) or 'redis' "
        "(shared by every proxy on redis_url).",
    )
    counters_flush_interval: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="With counters=redis: 0 asks Redis for every counted stanza (exact, one "
        "blocking round trip each); more than 0 counts this proxy's events at once and writes "
        "them to Redis that often, in one round trip (other proxies' events are seen that "
        "much later).",
    )
    sm_store: Literal["memory", "redis"] = Field(
        "memory",
        description="Where XEP-0198 stream-management states live: 'memory' (a client resumes "
        "through this proxy only) or 'redis' (through any proxy on redis_url).",
    )
    sm_resume_timeout: float = Field(
        600.0,
        ge=1.0,
        le=86_400.0,
        description="Seconds a stream-management state is kept for a resumption (match the "
        "server's, Prosody's smacks_hibernation_time).",
    )
    seen_ledger: Literal["memory", "redis"] = Field(
        "memory",
        description="Which record ids count as already decided: those this proxy spooled "
        "('memory') or those any proxy on redis_url spooled ('redis'), so that the recipient's "
        "proxy adds an observation instead of deciding the sender's message again.",
    )
    seen_ledger_ttl: float = Field(
        86_400.0,
        ge=1.0,
        le=30 * 86_400.0,
        description="Seconds a record id stays in the shared duplicate ledger (seen_ledger=redis).",
    )
    policy_sync: Literal["off", "redis"] = Field(
        "off",
        description="'redis': publish the policy in force on redis_url and follow what other "
        "proxies publish, so all replicas enforce one version.",
    )
    review_queue: Literal["files", "redis"] = Field(
        "files",
        description="How officers' review actions reach the proxies and released messages "
        "their recipients: 'files' (DATA/review, read by the proxy on this machine) or 'redis' "
        "(a queue any proxy on redis_url takes requests from; whichever proxy holds the "
        "recipient's sessions delivers).",
    )
    redis_url: SecretStr | None = Field(
        None, description="redis://[:PASSWORD@]HOST:PORT/DB (or rediss://) for celery/redis."
    )
    index_task_timeout: float = Field(
        30.0, gt=0, le=3600, description="Seconds a shipped batch may take before it is resent."
    )
    worker_concurrency: int = Field(
        2, ge=1, le=256, description="Processes per `stanzaguard worker`."
    )
    # Celery beat's jobs (stanzaguard/beat_tasks.py); an interval of 0 leaves a job out.
    audit_checkpoint_interval: float = Field(
        3600.0, ge=0, description="Seconds between signed audit-log checkpoints (beat; 0: off)."
    )
    blocklist_downloads: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="PATH=URL: beat downloads URL into PATH (one of blocklist_files), checked "
        "strictly first; the proxies reload the file when it changes.",
    )
    blocklist_refresh_interval: float = Field(
        3600.0, ge=0, description="Seconds between block-list downloads (beat; 0: off)."
    )
    retrain_interval: float = Field(
        0.0, ge=0, description="Seconds between scheduled retrains (beat; 0: off, the default)."
    )
    retrain_activate: bool = Field(
        False,
        description="Activate each scheduled retrain's version (as system:retrain); false "
        "leaves it for `stanzaguard model activate`.",
    )
    retrain_base: Path | None = Field(
        None, description="Base data set of scheduled retrains (default: the model's record)."
    )
    retrain_folds: int = Field(
        10, ge=2, le=20, description="Cross-validation folds of a scheduled retrain."
    )
    # -- end distributed mode --
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
    # -- the block list StanzaGuard publishes (docs/rtbl-publishing.md) --
    blocklist_learning: bool = Field(
        False,
        description="Keep a published block list of spam sources learned from officers' "
        "confirmations and users' reports (served over HTTP, published with rtbl_publish_*).",
    )
    blocklist_review: Literal["auto", "approve"] = Field(
        "approve",
        description="auto: publish what the listing rule wants at once; approve: an officer "
        "approves each entry first (`stanzaguard rtbl`, POST /api/v1/rtbl/decisions).",
    )
    blocklist_jid_officer_spam: int = Field(
        1, ge=1, le=1000, description="Messages officers confirmed as spam that list a JID."
    )
    blocklist_jid_report_weight: float = Field(
        3.0, gt=0, le=1000, description="Weight of distinct reporters' spam reports listing a JID."
    )
    blocklist_domain_listed_jids: int = Field(
        3, ge=1, le=100_000, description="Listed JIDs of one remote domain that list the domain."
    )
    blocklist_http: Literal["off", "public", "token"] = Field(
        "token",
        description="Serve /api/v1/rtbl/*.txt: without a token (public; for mod_firewall's "
        "%LIST http://, which sends none), with one (token), or not at all (off).",
    )
    blocklist_http_plain_jids: bool = Field(
        False,
        description="Also serve jids.txt (bare JIDs in clear) for consumers that cannot hash "
        "to hex, such as mod_firewall; the default lists publish SHA-256 only.",
    )
    rtbl_publish_service: str | None = Field(
        None, description="Pubsub service JID to publish the block list to (off when unset)."
    )
    rtbl_publish_jid: str | None = Field(
        None, description="Account that publishes (must be allowed to create nodes there)."
    )
    rtbl_publish_password: SecretStr | None = Field(None, description="Password of it.")
    rtbl_publish_server: HostPort | None = Field(
        None, description="HOST:PORT of rtbl_publish_jid's server; default: DNS (SRV)."
    )
    rtbl_publish_tls: Literal["starttls", "direct", "plain"] = Field(
        "starttls", description="TLS to rtbl_publish_server: starttls, direct, plain (dev)."
    )
    rtbl_publish_ca_file: Path | None = Field(None, description="CA bundle for its TLS.")
    rtbl_publish_domain_nodes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["spam_source_domains"],
        description="Nodes that get listed domains (xmppbl.org, mod_anti_spam names).",
    )
    rtbl_publish_jid_nodes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["spam_source_jids_sha256", "muc_bans_sha256"],
        description="Nodes that get SHA-256 of listed JIDs (mod_anti_spam, mod_muc_rtbl names).",
    )
    # -- end of the published block list --
    # -- component mode (`stanzaguard component`, docs/integrations/component.md) --
    component_jid: str | None = Field(
        None, description="The XEP-0114 component's domain (archive.example) in component mode."
    )
    component_secret: SecretStr | None = Field(
        None, description="The shared secret of the server's Component section."
    )
    component_server: HostPort = Field(
        "127.0.0.1:5347", description="HOST:PORT of the server's component port."
    )
    component_admins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bare JIDs allowed to run the component's ad-hoc commands, comma-separated.",
    )
    component_chain_name: str = Field(
        "component",
        description="The component's own hash chain in the store (its spool is "
        "DATA_DIR/component/spool); same rules as chain_name.",
    )
    # -- end component mode --
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

    @field_validator("api_listen", "listen_websocket", "listen_bosh", mode="before")
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

    @field_validator("es_url", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("es_url")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        if len(value) > 64:
            raise ValueError("at most 64 Elasticsearch URLs")
        return [check_es_url(url) for url in value]

    @field_validator("chain_name", "component_chain_name")
    @classmethod
    def _check_chain_name(cls, value: str) -> str:
        if not CHAIN_NAME_RE.fullmatch(value):
            raise ValueError(
                f"{value[:70]!r} is not a chain name: use 1 to 63 lower-case letters, digits, "
                "'-', '_' or '.'"
            )
        if value == AUDIT_CHAIN:
            # The same key signs both: a spool checkpoint of a chain named like the audit
            # log's would read as a signed audit checkpoint.
            raise ValueError(f"{AUDIT_CHAIN!r} is the audit log's chain; choose another name")
        return value

    @field_validator("es_index_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not ES_INDEX_PREFIX_RE.fullmatch(value):
            raise ValueError(
                "lower-case letters, digits, '-' or '_', starting with a letter or digit "
                "(at most 61)"
            )
        return value

    @model_validator(mode="after")
    def _check_store(self) -> Self:
        if self.store == "elasticsearch" and not self.es_url:
            raise ValueError("es_url: required with store=elasticsearch")
        if (self.es_username is None) != (self.es_password is None):
            raise ValueError("es_username/es_password: give both or neither")
        if self.es_api_key is not None and self.es_username is not None:
            raise ValueError("es_api_key/es_username: give an API key or a user, not both")
        has_credentials = self.es_api_key is not None or self.es_username is not None
        plain = [url for url in self.es_url if url.lower().startswith("http://")]
        if has_credentials and plain and self.environment == "production":
            raise ValueError(
                "es_url: credentials over plain http are refused outside "
                "environment=development (use https://)"
            )
        return self

    @model_validator(mode="after")
    def _check_downloads(self) -> Self:
        files = {spec.partition(":")[2] for spec in self.blocklist_files}
        for download in self.blocklist_downloads:
            path, sep, url = download.partition("=")
            if not sep or not path or not url:
                raise ValueError(f"blocklist_downloads: {download[:80]!r} is not PATH=URL")
            if path not in files:
                raise ValueError(f"blocklist_downloads: {path[:80]!r} is not in blocklist_files")
            plain_ok = self.environment == "development"
            if not url.startswith("https://") and not (plain_ok and url.startswith("http://")):
                raise ValueError(
                    "blocklist_downloads: the URL must be https:// (http:// only with "
                    "environment=development)"
                )
            if len(url) > 2048 or not url.isprintable() or any(c.isspace() for c in url):
                raise ValueError("blocklist_downloads: URL too long or not printable")
        return self

    @model_validator(mode="after")
    def _check_redis(self) -> Self:
        if self.redis_url is None:
            if (
                self.indexing == "celery"
                or self.counters == "redis"
                or self.sm_store == "redis"
                or self.seen_ledger == "redis"
                or self.policy_sync == "redis"
                or self.review_queue == "redis"
            ):
                raise ValueError(
                    "redis_url: required with indexing=celery, counters=redis, "
                    "sm_store=redis, seen_ledger=redis, policy_sync=redis or review_queue=redis"
                )
            return self
        url = self.redis_url.get_secret_value()
        if len(url) > 2048 or not url.isprintable() or any(c.isspace() for c in url):
            raise ValueError("redis_url: too long, or spaces or control characters")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url: must start with redis://, rediss:// or unix://")
        return self

    @field_validator(
        "rtbl_nodes", "blocklist_files", "blocklist_downloads", "component_admins", mode="before"
    )
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("rtbl_publish_domain_nodes", "rtbl_publish_jid_nodes", mode="before")
    @classmethod
    def _split_nodes(cls, value: Any) -> Any:
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
