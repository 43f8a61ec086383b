"""The `stanzaguard` command."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table
from rich.text import Text

from stanzaguard.errors import StanzaGuardError
from stanzaguard.event_loop import run_on
from stanzaguard.logs import configure_logging
from stanzaguard.settings import load_settings
from stanzaguard.tls import write_dev_cert

if TYPE_CHECKING:
    from stanzaguard.stores import StoreSpec

app = typer.Typer(
    name="stanzaguard",
    help="Compliance-archiving and anti-SPIM proxy for XMPP.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# soft_wrap: messages (paths in errors above all) stay whole lines for copying and for logs.
err = Console(stderr=True, soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", help="TOML settings file (or STANZAGUARD_CONFIG).", envvar="STANZAGUARD_CONFIG"
    ),
]


def _fail(exc: Exception) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    return typer.Exit(2)


@app.command()
def run(
    config: ConfigOption = None,
    domain: Annotated[
        list[str] | None, typer.Option(help="XMPP domain served; repeat for several.")
    ] = None,
    upstream: Annotated[
        str | None, typer.Option(help="XMPP server c2s port, HOST:PORT (default 127.0.0.1:5222).")
    ] = None,
    cert: Annotated[Path | None, typer.Option(help="PEM certificate for the domain.")] = None,
    key: Annotated[Path | None, typer.Option(help="PEM private key for the domain.")] = None,
    listen: Annotated[
        str | None, typer.Option(help="STARTTLS listener, HOST:PORT (default 0.0.0.0:5222).")
    ] = None,
    listen_tls: Annotated[
        str | None, typer.Option(help="Direct TLS listener, HOST:PORT (default 0.0.0.0:5223).")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Spool, archive and keys (default ./stanzaguard-data).")
    ] = None,
    policy: Annotated[Path | None, typer.Option(help="Policy file (TOML).")] = None,
    upstream_tls: Annotated[
        bool | None, typer.Option("--upstream-tls/--no-upstream-tls", help="TLS to the server.")
    ] = None,
    allow_plaintext: Annotated[
        bool | None,
        typer.Option(
            "--allow-plaintext/--no-allow-plaintext",
            help="Accept unencrypted clients (development only).",
        ),
    ] = None,
    environment: Annotated[
        str | None, typer.Option(help="'production' (default) or 'development'.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Text model: 'default' (shipped), a model directory, or 'off'."),
    ] = None,
) -> None:
    """Run the inline proxy in front of an XMPP server.

    Every option can also be set as STANZAGUARD_<NAME> or in the TOML file given by --config;
    see docs/configuration.md for all settings and their defaults.
    """
    from stanzaguard.wiring import serve

    try:
        settings = load_settings(
            config,
            domain=domain or None,
            upstream=upstream,
            cert=cert,
            key=key,
            listen=listen,
            listen_tls=listen_tls,
            data_dir=data_dir,
            policy=policy,
            upstream_tls=upstream_tls,
            allow_plaintext=allow_plaintext,
            environment=environment,
            model=model,
        )
        configure_logging(settings.log_level, settings.log_format)
        run_on(settings.event_loop, serve(settings))
    except StanzaGuardError as exc:
        raise _fail(exc) from None


@app.command()
def api(
    config: ConfigOption = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="The data directory (default ./stanzaguard-data).")
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT to serve on (default: the api_listen setting, 127.0.0.1:8080)."
        ),
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="Policy file (TOML) the editor writes.")
    ] = None,
    environment: Annotated[
        str | None, typer.Option(help="'production' (default) or 'development'.")
    ] = None,
) -> None:
    """Serve the search, review and audit API (and web UI) alone, without the proxy.

    Review decisions reach a running `stanzaguard run` on the same data directory through
    its review mailbox; policy versions written here are picked up by it within a second.
    """
    from stanzaguard.api_wiring import serve_api

    try:
        settings = load_settings(config, data_dir=data_dir, policy=policy, environment=environment)
        address = listen or settings.api_listen
        if not address:
            raise StanzaGuardError("--listen: give HOST:PORT (api_listen is off)")
        configure_logging(settings.log_level, settings.log_format)
        run_on(settings.event_loop, serve_api(settings, address))
    except StanzaGuardError as exc:
        raise _fail(exc) from None


@app.command()
def component(
    config: ConfigOption = None,
    domain: Annotated[
        list[str] | None,
        typer.Option(help="The server's domain (forwards are believed only from it); repeat."),
    ] = None,
    jid: Annotated[
        str | None, typer.Option(help="The component's domain, as in the server's Component.")
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(help="The server's component port, HOST:PORT (default 127.0.0.1:5347)."),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Spool, archive and keys (default ./stanzaguard-data).")
    ] = None,
    policy: Annotated[Path | None, typer.Option(help="Policy file (TOML).")] = None,
    environment: Annotated[
        str | None, typer.Option(help="'production' (default) or 'development'.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Text model: 'default' (shipped), a model directory, or 'off'."),
    ] = None,
) -> None:
    """Archive and score the copies an XMPP server forwards to an XEP-0114 component.

    This mode cannot block anything: the server has delivered a stanza before its copy
    arrives. The secret comes from STANZAGUARD_COMPONENT_SECRET or the --config file, never
    from the command line; see docs/integrations/component.md.
    """
    from stanzaguard.component_service import serve_component

    try:
        settings = load_settings(
            config,
            domain=domain or None,
            component_jid=jid,
            component_server=server,
            data_dir=data_dir,
            policy=policy,
            environment=environment,
            model=model,
        )
        configure_logging(settings.log_level, settings.log_format)
        run_on(settings.event_loop, serve_component(settings))
    except StanzaGuardError as exc:
        raise _fail(exc) from None


@app.command("dev-cert")
def dev_cert(
    domain: Annotated[str, typer.Argument(help="The XMPP domain.")],
    out: Annotated[Path, typer.Option(help="Directory for DOMAIN.crt and DOMAIN.key.")] = Path(),
) -> None:
    """Make a self-signed certificate and key for trials (clients must accept it)."""
    cert_path, key_path = write_dev_cert(domain, out, datetime.now(UTC))
    typer.echo(f"{cert_path}\n{key_path}")


DataDirOption = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="STANZAGUARD_DATA_DIR",
        help="The service's data directory (default ./stanzaguard-data).",
    ),
]


@app.command()
def search(
    query: Annotated[
        str, typer.Argument(help="e.g. 'from:alice@corp.example \"guaranteed return\"'")
    ],
    data_dir: DataDirOption = Path("stanzaguard-data"),
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record a line.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Most hits to show.")] = 50,
    sort: Annotated[str, typer.Option(help="time, time_asc or relevance.")] = "time",
    config: ConfigOption = None,
) -> None:
    """Search the archive: words, "phrases", -negation, from: to: with: after: before: ..."""
    from archive_api.store.errors import StoreError
    from stanzaguard import operations

    if sort not in ("time", "time_asc", "relevance"):
        raise _fail(StanzaGuardError("--sort must be time, time_asc or relevance"))
    try:
        store_spec = _configured_store(config, data_dir)
        page = asyncio.run(
            operations.search(
                operations.Paths(data_dir), query, limit=limit, sort=sort, store_spec=store_spec
            )
        )
    except (StanzaGuardError, StoreError) as exc:
        raise _fail(exc) from None
    if as_json:
        for hit in page.hits:
            record = hit.record.to_json()
            record.pop("raw", None)
            typer.echo(json.dumps(record, ensure_ascii=False))
        return
    table = Table("time (UTC)", "from", "to", "verdict", "text", show_lines=False)
    for hit in page.hits:
        r = hit.record
        text = Text()
        for part in hit.snippet:
            text.append(part.text, style="bold yellow" if part.match else None)
        if not hit.snippet:
            text.append(r.body or f"[{r.kind.value} {r.stanza_type}]")
        table.add_row(
            r.occurred_at.strftime("%Y-%m-%d %H:%M:%S"),
            r.sender_full or r.sender,
            r.recipient or r.room or "",
            r.verdict.action.value,
            text,
        )
    Console().print(table)
    Console(stderr=True).print(
        f"{len(page.hits)} hit(s){' (more available)' if page.next_cursor else ''}"
    )


def _configured_store(config: Path | None, data_dir: Path) -> StoreSpec:
    """The store the settings choose (`store`, `es_url`, ...; stanzaguard/stores.py)."""
    from stanzaguard.stores import spec_from_settings

    settings = load_settings(config, data_dir=data_dir)
    return spec_from_settings(settings, data_dir / "archive.sqlite3")


def _configured_chain(config: Path | None, data_dir: Path) -> str:
    """The chain_name setting: the spool's chain when its directory does not record one."""
    return load_settings(config, data_dir=data_dir).chain_name


@app.command()
def verify(
    data_dir: DataDirOption = Path("stanzaguard-data"),
    evidence_dir: Annotated[
        Path | None, typer.Option(help="Sealed segments (default DATA_DIR/evidence).")
    ] = None,
    audit: Annotated[
        bool, typer.Option("--audit", help="Verify the audit log instead of the archive.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Prove the archive whole: chain, signatures, and every spooled entry in the store.

    With --audit, prove the audit log whole instead: its hash chain and signed checkpoints.
    Exits 0 when whole; 1 naming the first break otherwise.
    """
    from archive_api.store.errors import StoreError
    from stanzaguard import operations

    if audit:
        _verify_audit(data_dir, config)
        return
    try:
        store_spec = _configured_store(config, data_dir)
        outcome = asyncio.run(
            operations.verify(
                operations.Paths(data_dir, evidence_dir),
                store_spec=store_spec,
                chain_name=_configured_chain(config, data_dir),
            )
        )
    except (StanzaGuardError, StoreError) as exc:
        raise _fail(exc) from None
    out = Console()
    report = outcome.store
    for chain in report.chains:
        signatures = "signed checkpoint(s) checked"
        if chain.chain in outcome.foreign_signatures:
            # Another proxy's chain: its key is on that proxy's volume, not here.
            signatures = "checkpoint(s) checked, signed by another proxy's key"
        out.print(
            f"chain {chain.chain}: {chain.last_seq} entries, head {chain.head.hex()[:16]}…, "
            f"{chain.checkpoints} {signatures}"
        )
    out.print(
        f"{report.records_checked} records and {outcome.spool_entries_checked} spooled "
        "entries checked"
    )
    if outcome.not_yet_indexed:
        out.print(f"{outcome.not_yet_indexed} spooled entries are not indexed yet")
    problems = [str(p) for p in report.problems] + outcome.spool_problems
    if problems:
        out.print(f"[bold red]BROKEN[/]: first break: {problems[0]}", highlight=False)
        for extra in problems[1:10]:
            out.print(f"  also: {extra}", highlight=False)
        raise typer.Exit(1)
    out.print("[bold green]OK[/]: no gap, no edit, no deletion")


@app.command()
def reindex(
    data_dir: DataDirOption = Path("stanzaguard-data"),
    evidence_dir: Annotated[
        Path | None, typer.Option(help="Sealed segments (default DATA_DIR/evidence).")
    ] = None,
    replace: Annotated[
        bool, typer.Option(help="Swap the rebuilt store in for the current one.")
    ] = False,
    move_from: Annotated[
        str | None,
        typer.Option("--from", help="Move an archive from this store: sqlite:PATH or es:URL."),
    ] = None,
    move_to: Annotated[
        str | None, typer.Option("--to", help="...into this store: sqlite:PATH or es:URL.")
    ] = None,
    from_prefix: Annotated[
        str | None, typer.Option(help="Index prefix of an es: source (default es_index_prefix).")
    ] = None,
    to_prefix: Annotated[
        str | None, typer.Option(help="Index prefix of an es: target (default es_index_prefix).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, max=100_000, help="Entries per write with --from/--to.")
    ] = 1000,
    config: ConfigOption = None,
) -> None:
    """Rebuild the SQLite archive from the kept evidence and spool segments (proxy stopped).

    With --from and --to, move an archive between stores instead (SQLite or Elasticsearch,
    either way), then check that both hold the same chains and the target verifies.
    Elasticsearch credentials come from the settings (STANZAGUARD_ES_API_KEY, ...).
    """
    from stanzaguard import operations

    if move_from is not None or move_to is not None:
        _move_archive(move_from, move_to, from_prefix, to_prefix, batch_size, config, data_dir)
        return
    if from_prefix is not None or to_prefix is not None:
        raise _fail(StanzaGuardError("--from-prefix/--to-prefix go with --from and --to"))
    paths = operations.Paths(data_dir, evidence_dir)
    target = data_dir / "archive.sqlite3.rebuild"
    try:
        chain_name = _configured_chain(config, data_dir)
    except StanzaGuardError as exc:
        raise _fail(exc) from None
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed} entries")
    ) as progress:
        task = progress.add_task("re-indexing", total=None)
        try:
            applied = asyncio.run(
                operations.rebuild(
                    paths,
                    target,
                    progress=lambda n: progress.update(task, completed=n),
                    chain_name=chain_name,
                )
            )
        except StanzaGuardError as exc:
            raise _fail(exc) from None
    typer.echo(f"rebuilt {applied} entries into {target}")
    if replace:
        for suffix in ("", "-wal", "-shm"):
            old = paths.store.with_name(paths.store.name + suffix)
            if old.exists():
                old.rename(old.with_name(old.name + ".old"))
        target.rename(paths.store)
        typer.echo(f"replaced {paths.store} (previous kept as .old)")


def _move_archive(
    source: str | None,
    target: str | None,
    from_prefix: str | None,
    to_prefix: str | None,
    batch_size: int,
    config: Path | None,
    data_dir: Path,
) -> None:
    """`reindex --from SPEC --to SPEC`: copy, show progress, report the end-of-move check."""
    from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn

    from archive_api.store.errors import StoreError
    from stanzaguard import operations
    from stanzaguard.stores import EsCredentials, parse_store_spec

    if source is None or target is None:
        raise _fail(StanzaGuardError("give both --from and --to (sqlite:PATH or es:URL)"))
    try:
        settings = load_settings(config)
        credentials = EsCredentials.from_settings(settings)
        source_spec = parse_store_spec(
            source,
            es_index_prefix=from_prefix or settings.es_index_prefix,
            credentials=credentials,
        )
        target_spec = parse_store_spec(
            target, es_index_prefix=to_prefix or settings.es_index_prefix, credentials=credentials
        )
        key = operations.public_key(operations.Paths(data_dir))
    except StanzaGuardError as exc:
        raise _fail(exc) from None
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
    ) as progress:
        task = progress.add_task(f"moving to {target_spec}", total=None)
        try:
            outcome = asyncio.run(
                operations.move_archive(
                    source_spec,
                    target_spec,
                    batch_size=batch_size,
                    public_key=key,
                    progress=lambda done, total: progress.update(task, completed=done, total=total),
                )
            )
        except (StanzaGuardError, StoreError) as exc:
            raise _fail(exc) from None
    out = Console()
    for move in outcome.chains:
        out.print(
            f"chain {move.chain}: {move.entries} entries ({move.already_there} already there), "
            f"head {move.head.hex()[:16]}…",
            highlight=False,
        )
    out.print(
        f"copied {outcome.copied} entries and {outcome.checkpoints_copied} checkpoint(s); "
        f"records: {outcome.source_records} in the source, {outcome.target_records} in the "
        "target",
        highlight=False,
    )
    out.print(
        f"legal holds copied or released: {outcome.holds_copied}; retention assignments "
        f"copied: {outcome.retention_copied}; audit events copied: {outcome.audit_copied} "
        f"(and {outcome.audit_checkpoints_copied} signed audit checkpoint(s)); API tokens "
        f"copied: {outcome.tokens_copied}",
        highlight=False,
    )
    if not outcome.ok:
        out.print(f"[bold red]MISMATCH[/]: {outcome.problems[0]}", highlight=False)
        for extra in outcome.problems[1:10]:
            out.print(f"  also: {extra}", highlight=False)
        raise typer.Exit(1)
    out.print(f"[bold green]OK[/]: {target_spec} holds the same chains and verifies")


# -- quarantine review and labels (applied by the running service: stanzaguard/quarantine.py) --

quarantine_app = typer.Typer(
    help="Review quarantined messages: list them, release them, confirm them as spam.",
    no_args_is_help=True,
)
app.add_typer(quarantine_app, name="quarantine")

ActorOption = Annotated[
    str, typer.Option("--actor", help="Who decides (recorded in the audit trail).")
]
WaitOption = Annotated[
    float,
    typer.Option("--wait", min=0.0, help="Seconds to wait for the running service to apply it."),
]


@quarantine_app.command("list")
def quarantine_list(
    data_dir: DataDirOption = Path("stanzaguard-data"),
    show_all: Annotated[
        bool, typer.Option("--all", help="Also released and confirmed-spam messages.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record a line.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Most records to show.")] = 500,
    config: ConfigOption = None,
) -> None:
    """List held (quarantined) messages, oldest first, with their record ids.

    With --config, from the archive the settings choose (Elasticsearch with several proxies).
    """
    from archive_api.store.errors import StoreError
    from stanzaguard import operations
    from stanzaguard.quarantine import held_records

    async def fetch(spec: StoreSpec | None) -> list[Any]:
        store = await operations.open_chosen_store(operations.Paths(data_dir), spec)
        try:
            return await held_records(store, limit=limit, include_decided=show_all)
        finally:
            await store.close()

    try:
        spec = _configured_store(config, data_dir) if config is not None else None
        records = asyncio.run(fetch(spec))
    except (StanzaGuardError, StoreError) as exc:
        raise _fail(exc) from None
    if as_json:
        for r in records:
            record = r.to_json()
            record.pop("raw", None)
            typer.echo(json.dumps(record, ensure_ascii=False))
        return
    table = Table("record id", "time (UTC)", "from", "to", "status", "why", "text")
    for r in records:
        why = "; ".join(x.detail for x in r.verdict.reasons if x.action == r.verdict.action)
        table.add_row(
            r.record_id,
            r.occurred_at.strftime("%Y-%m-%d %H:%M:%S"),
            r.sender_full or r.sender,
            r.recipient,
            r.status.value,
            why,
            (r.body or "")[:80],
        )
    Console(width=200).print(table)
    Console(stderr=True).print(f"{len(records)} message(s)")


def _submit(
    kind: str, record_id: str, actor: str, data_dir: Path, wait: float, config: Path | None
) -> None:
    from stanzaguard.api_wiring import review_channel
    from stanzaguard.quarantine import FileChannel, Outcome, Request, RequestKind, ReviewChannel

    try:
        settings = load_settings(config, data_dir=data_dir) if config is not None else None
    except StanzaGuardError as exc:
        raise _fail(exc) from None
    channel: ReviewChannel
    if settings is not None and settings.review_queue == "redis":
        channel = review_channel(settings)
    else:
        if not (data_dir / "spool").is_dir() and not (data_dir / "archive.sqlite3").exists():
            raise _fail(
                StanzaGuardError(f"no StanzaGuard data in {data_dir} (is --data-dir right?)")
            )
        channel = FileChannel(data_dir)

    async def submit() -> tuple[Request, Outcome | None]:
        try:
            request = await channel.submit(RequestKind(kind), record_id, actor)
            return request, await channel.wait(request.request_id, wait)
        finally:
            await channel.close()

    try:
        request, outcome = asyncio.run(submit())
    except StanzaGuardError as exc:
        raise _fail(exc) from None
    if outcome is None:
        typer.echo(
            f"request {request.request_id} queued: the running service applies it within a "
            "second (or when it starts, if it is not running)"
        )
        raise typer.Exit(3)
    typer.echo(f"{record_id}: {outcome.detail}")
    if not outcome.ok:
        raise typer.Exit(1)


@quarantine_app.command("release")
def quarantine_release(
    record_id: Annotated[str, typer.Argument(help="The held message's record id.")],
    actor: ActorOption,
    data_dir: DataDirOption = Path("stanzaguard-data"),
    wait: WaitOption = 10.0,
    config: ConfigOption = None,
) -> None:
    """Release a held message: audited, then delivered (now, or at the recipient's login).

    Exits 0 when applied, 1 when refused, 3 when queued but not applied within --wait.
    """
    _submit("release", record_id, actor, data_dir, wait, config)


@quarantine_app.command("confirm-spam")
def quarantine_confirm_spam(
    record_id: Annotated[str, typer.Argument(help="The held message's record id.")],
    actor: ActorOption,
    data_dir: DataDirOption = Path("stanzaguard-data"),
    wait: WaitOption = 10.0,
    config: ConfigOption = None,
) -> None:
    """Confirm a held message as spam: audited; it is never delivered.

    Exits 0 when applied, 1 when refused, 3 when queued but not applied within --wait.
    """
    _submit("confirm-spam", record_id, actor, data_dir, wait, config)


@app.command()
def label(
    record_id: Annotated[str, typer.Argument(help="An archived message's record id.")],
    verdict: Annotated[str, typer.Argument(help="spam or ham.")],
    actor: ActorOption,
    data_dir: DataDirOption = Path("stanzaguard-data"),
    wait: WaitOption = 10.0,
    config: ConfigOption = None,
) -> None:
    """Label an archived message spam or ham: a training example (and reputation, for spam)."""
    if verdict not in ("spam", "ham"):
        raise _fail(StanzaGuardError("the label must be 'spam' or 'ham'"))
    _submit(f"label-{verdict}", record_id, actor, data_dir, wait, config)


# -- text model: train and evaluate (work in stanzaguard/textmodel.py) ------------------------

DataOption = Annotated[Path, typer.Option("--data", help="Labelled messages.", exists=True)]
FormatOption = Annotated[
    str,
    typer.Option("--format", help="sms (label<TAB>text), csv (header label,text) or jsonl."),
]
FoldsOption = Annotated[int, typer.Option("--folds", min=2, max=50, help="Cross-validation folds.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the fold assignment.")]
RepeatsOption = Annotated[
    int,
    typer.Option(
        "--repeats",
        min=1,
        max=20,
        help="Repeat the cross-validation with fold seeds --seed, --seed+1, ...; "
        "prints each and the pooled figures.",
    ),
]


def _fold_progress() -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
    )


def _print_metrics(title: str, *rows: Any) -> None:
    """One table row per metrics object; ``rows`` are metrics or ``(label, metrics)`` pairs."""
    table = Table(title=title)
    labelled = [row if isinstance(row, tuple) else ("", row) for row in rows]
    has_labels = any(label for label, _ in labelled)
    if has_labels:
        table.add_column("")
    for column in ("spam caught", "blocked ham", "MCC", "precision", "TP", "FP", "TN", "FN"):
        table.add_column(column, justify="right")
    for label, metrics in labelled:
        cells = [
            f"{metrics.spam_caught:.2%}",
            f"{metrics.blocked_ham:.3%}",
            f"{metrics.mcc:.4f}",
            f"{metrics.precision:.2%}",
            *(str(n) for n in (metrics.tp, metrics.fp, metrics.tn, metrics.fn)),
        ]
        table.add_row(*([label] if has_labels else []), *cells)
    Console().print(table)


def _print_repeated(title: str, repeated: Any) -> None:
    """One cross-validation's row, or each repetition's and the pooled one."""
    if len(repeated.runs) == 1:
        _print_metrics(title, repeated.block)
        return
    rows = [(f"seed {run.config.seed}", run.block) for run in repeated.runs]
    _print_metrics(f"{title}, {len(repeated.runs)} repetitions", *rows, ("pooled", repeated.block))


@app.command()
def train(
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", help="Directory for model.npz and model.json.")],
    data_format: FormatOption = "sms",
    folds: FoldsOption = 10,
    seed: SeedOption = 0,
    evaluate: Annotated[
        bool,
        typer.Option(
            "--evaluate/--no-evaluate", help="Cross-validate first, for the metadata's metrics."
        ),
    ] = True,
    repeats: RepeatsOption = 1,
) -> None:
    """Train the text model on all of --data and write it to --out.

    First runs the duplicate-grouped cross-validation of `stanzaguard evaluate` so that the
    model's metadata carries honest metrics, then fits on every row.
    """
    from stanzaguard.datasets import load_dataset
    from stanzaguard.models import save_model
    from stanzaguard.textmodel import train_config, train_model

    command = f"stanzaguard train --data {data} --format {data_format} --out {out}"
    if folds != 10 or seed != 0:
        command += f" --folds {folds} --seed {seed}"
    if not evaluate:
        command += " --no-evaluate"
    elif repeats != 1:
        command += f" --repeats {repeats}"
    try:
        dataset = load_dataset(data, data_format)
        err.print(f"{data}: {len(dataset.samples)} messages ({dataset.spam} spam)")
        config = train_config(folds=folds, seed=seed)
        with _fold_progress() as progress:
            task = progress.add_task("training", total=None)
            outcome = train_model(
                dataset,
                command=command,
                created=datetime.now(UTC),
                config=config,
                evaluate=evaluate,
                repeats=repeats,
                progress=lambda done, total, what: progress.update(
                    task, completed=done, total=total, description=what
                ),
            )
        files = save_model(outcome.model, out)
    except StanzaGuardError as exc:
        raise _fail(exc) from None
    if outcome.repeated is not None:
        _print_repeated(f"{folds}-fold cross-validation, duplicates grouped", outcome.repeated)
    thresholds = outcome.model.thresholds
    typer.echo(f"thresholds: block {thresholds.block:.4f}, flag {thresholds.flag:.4f}")
    typer.echo(f"{files.npz}\n{files.json}")


@app.command()
def evaluate(
    data: DataOption,
    report: Annotated[Path, typer.Option("--report", help="Directory for the JSON and PNG.")],
    data_format: FormatOption = "sms",
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            help="A trained model: cross-validate its recipe and also score --data with it as is.",
        ),
    ] = None,
    folds: FoldsOption = 10,
    seed: SeedOption = 0,
    repeats: RepeatsOption = 1,
) -> None:
    """Duplicate-grouped cross-validation of the text model's recipe on --data.

    Prints spam caught, blocked ham and MCC at the block threshold (chosen inside each fold),
    and writes evaluation.json and curves.png (precision-recall and ROC) to --report. With
    --repeats N the cross-validation runs N times on different fold assignments and the
    pooled confusion matrix is printed as well (repeated k-fold cross-validation).
    """
    from stanzaguard.datasets import load_dataset
    from stanzaguard.models import load_model
    from stanzaguard.textmodel import (
        evaluate_dataset,
        fixed_model_metrics,
        train_config,
        write_report,
    )

    command = f"stanzaguard evaluate --data {data} --format {data_format} --report {report}"
    if model is not None:
        command += f" --model {model}"
    if folds != 10 or seed != 0:
        command += f" --folds {folds} --seed {seed}"
    if repeats != 1:
        command += f" --repeats {repeats}"
    try:
        dataset = load_dataset(data, data_format)
        err.print(f"{data}: {len(dataset.samples)} messages ({dataset.spam} spam)")
        trained = load_model(model) if model is not None else None
        config = train_config(trained, folds=folds, seed=seed)
        with _fold_progress() as progress:
            task = progress.add_task("cross-validation", total=None)
            repeated = evaluate_dataset(
                dataset,
                config,
                repeats=repeats,
                progress=lambda done, total, what: progress.update(
                    task, completed=done, total=total, description=what
                ),
            )
        extra = None
        if trained is not None:
            extra = {"given_model": fixed_model_metrics(trained, dataset.samples)}
        json_path, png_path = write_report(
            repeated,
            report,
            dataset=dataset,
            command=command,
            created=datetime.now(UTC),
            extra=extra,
        )
    except StanzaGuardError as exc:
        raise _fail(exc) from None
    evaluation = repeated.runs[0]
    _print_repeated(f"{folds}-fold cross-validation, duplicates grouped", repeated)
    typer.echo(
        f"ROC AUC {evaluation.curves.roc_auc:.4f}, "
        f"average precision {evaluation.curves.average_precision:.4f}"
    )
    if extra is not None:
        block = extra["given_model"]["block"]
        typer.echo(
            f"given model as is: spam caught {block['spam_caught']:.2%}, blocked ham "
            f"{block['blocked_ham']:.3%}, MCC {block['mcc']:.4f}"
        )
    typer.echo(f"{json_path}\n{png_path}")


# -- end of text model commands ---------------------------------------------------------------

# -- model versions: retrain, list, activate, rollback (stanzaguard/retrain.py, registry.py) --


@app.command()
def retrain(
    data_dir: DataDirOption = Path("stanzaguard-data"),
    base: Annotated[
        Path | None,
        typer.Option(
            "--base", help="Base data set (default: the one the model in use was trained on)."
        ),
    ] = None,
    data_format: Annotated[
        str | None, typer.Option("--format", help="Format of --base: sms, csv or jsonl.")
    ] = None,
    folds: FoldsOption = 10,
    seed: SeedOption = 0,
    activate: Annotated[
        bool, typer.Option("--activate", help="Make the new version active at once (--actor).")
    ] = False,
    actor: Annotated[
        str | None, typer.Option("--actor", help="Who activates (with --activate).")
    ] = None,
) -> None:
    """Train a new model version on the base data set plus reports and officers' labels.

    Cross-validates first (the version keeps the metrics), then stores DATA/models/vNNNN.
    """
    from stanzaguard.clock import SystemClock
    from stanzaguard.retrain import retrain as run_retrain

    if activate and actor is None:
        raise _fail(StanzaGuardError("--activate needs --actor (who activates)"))
    command = f"stanzaguard retrain --data-dir {data_dir}"
    if base is not None:
        command += f" --base {base} --format {data_format or 'sms'}"
    if folds != 10 or seed != 0:
        command += f" --folds {folds} --seed {seed}"
    try:
        with _fold_progress() as progress:
            task = progress.add_task("retraining", total=None)
            outcome = run_retrain(
                data_dir,
                clock=SystemClock(),
                command=command,
                base_path=base,
                base_format=data_format,
                folds=folds,
                seed=seed,
                activate_as=actor if activate else None,
                progress=lambda done, total, what: progress.update(
                    task, completed=done, total=total, description=what
                ),
            )
    except StanzaGuardError as exc:
        raise _fail(exc) from None
    used = outcome.training.examples
    err.print(
        f"base {outcome.base.path}: {len(outcome.base.samples)} messages; labelled examples: "
        f"{used['used']} ({used['spam']} spam, {used['ham']} ham, weight {used['weight_sum']:.2f})"
    )
    if outcome.evaluation is not None:
        _print_metrics(
            f"{folds}-fold cross-validation, duplicates grouped", outcome.evaluation.block
        )
    typer.echo(f"version {outcome.version} stored in {data_dir / 'models' / outcome.version}")
    if outcome.activation is not None:
        typer.echo(f"{outcome.version} is active; a running service switches within a second")


model_app = typer.Typer(
    help="Text model versions: list them, activate one, roll back.", no_args_is_help=True
)
app.add_typer(model_app, name="model")


@model_app.command("list")
def model_list(
    data_dir: DataDirOption = Path("stanzaguard-data"),
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a version.")] = False,
) -> None:
    """The versions with their cross-validated metrics; which is active and which serving."""
    from stanzaguard.clock import SystemClock
    from stanzaguard.registry import ModelRegistry, RegistryError, VersionSummary

    registry = ModelRegistry.of(data_dir, SystemClock())
    try:
        state = registry.read_state()
        serving = registry.read_serving()
    except RegistryError as exc:
        raise _fail(exc) from None
    in_use = serving.version if serving is not None else None
    rows = [VersionSummary.of(info, state.active, in_use) for info in registry.versions()]
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row.to_json(), ensure_ascii=False))
        return
    table = Table("version", "created", "base rows", "examples", "spam caught", "blocked ham")
    table.add_column("MCC")
    table.add_column("state")
    for row in rows:
        block = row.block or {}
        flags = [word for word, on in (("active", row.active), ("serving", row.serving)) if on]
        table.add_row(
            row.version,
            row.created or "-",
            "-" if row.base_rows is None else str(row.base_rows),
            "-" if row.examples is None else str(row.examples),
            f"{block['spam_caught']:.2%}" if "spam_caught" in block else "-",
            f"{block['blocked_ham']:.3%}" if "blocked_ham" in block else "-",
            f"{block['mcc']:.4f}" if "mcc" in block else "-",
            row.error or " ".join(flags),
        )
    Console(width=200).print(table)
    configured = "the configured model (setting `model`)"
    Console(stderr=True).print(f"active: {state.active or configured}", highlight=False)
    if serving is not None:
        note = f"serving: {serving.label or 'no model'} since {serving.since:%Y-%m-%d %H:%M:%S}"
        if serving.error:
            note += f"; last load error: {serving.error.get('message', '')}"
        Console(stderr=True).print(note, highlight=False)


ModelWaitOption = Annotated[
    float,
    typer.Option(
        "--wait", min=0.0, help="Seconds to wait for a running service to switch (0: do not)."
    ),
]


def _switched(data_dir: Path, change: str, actor: str, version: str | None, wait: float) -> None:
    from stanzaguard.clock import SystemClock
    from stanzaguard.registry import ModelRegistry

    registry = ModelRegistry.of(data_dir, SystemClock())
    try:
        if change == "rollback":
            entry = registry.rollback(actor)
        else:
            assert version is not None
            entry = registry.activate(version, actor)
    except StanzaGuardError as exc:
        raise _fail(exc) from None
    name = entry.version or "the configured model"
    typer.echo(f"active: {name} (was {entry.previous or 'the configured model'})")
    if wait <= 0:
        return
    serving = registry.wait_serving(entry.version, entry.at, wait)
    if serving is None:
        typer.echo("the running service has not switched yet (is it running?)")
        raise typer.Exit(3)
    if serving.version != entry.version:
        typer.echo(f"the running service could not load it: {(serving.error or {}).get('message')}")
        raise typer.Exit(1)
    typer.echo(f"the running service uses {serving.label or 'no model'}")


@model_app.command("activate")
def model_activate(
    version: Annotated[str, typer.Argument(help="A version (v0003), or 'configured'.")],
    actor: ActorOption,
    data_dir: DataDirOption = Path("stanzaguard-data"),
    wait: ModelWaitOption = 0.0,
) -> None:
    """Make a version the active model; a running service swaps it in within a second.

    Exits 0 when done (with --wait: when the service uses it), 1 when the service could
    not load it, 2 when refused, 3 when the service did not switch within --wait.
    """
    _switched(data_dir, "activate", actor, version.strip(), wait)


@model_app.command("rollback")
def model_rollback(
    actor: ActorOption,
    data_dir: DataDirOption = Path("stanzaguard-data"),
    wait: ModelWaitOption = 0.0,
) -> None:
    """Go back to the version active before the current one (exit codes as activate)."""
    _switched(data_dir, "rollback", actor, None, wait)


# -- end of model version commands -------------------------------------------------------------


# -- API tokens and the audit log (stanzaguard/access.py) ----------------------------------------


def _verify_audit(data_dir: Path, config: Path | None) -> None:
    from archive_api.store.errors import StoreError
    from stanzaguard import access, operations

    try:
        store_spec = _configured_store(config, data_dir)
        outcome = asyncio.run(access.verify_audit(operations.Paths(data_dir), store_spec))
    except (StanzaGuardError, StoreError) as exc:
        raise _fail(exc) from None
    out = Console()
    report = outcome.report
    out.print(
        f"audit log: {report.events_checked} events, last seq {report.last_seq}, head "
        f"{report.head.hex()[:16]}…, {report.checkpoints_checked} signed checkpoint(s) checked"
    )
    if not outcome.key_found:
        err.print(
            "[yellow]warning:[/] no public key in DATA_DIR/keys: checkpoint signatures "
            "were not checked",
            highlight=False,
        )
    if report.problems:
        first, *rest = report.problems
        out.print(
            f"[bold red]BROKEN[/]: first break at seq {first.seq}: {first.problem}",
            highlight=False,
        )
        for extra in rest[:10]:
            out.print(f"  also: seq {extra.seq}: {extra.problem}", highlight=False)
        raise typer.Exit(1)
    out.print("[bold green]OK[/]: no gap, no edit, no deletion in the audit log")


token_app = typer.Typer(
    help="API tokens for the search, review and audit API: create, list, revoke.",
    no_args_is_help=True,
)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option("--role", help="admin, officer or auditor.")],
    name: Annotated[
        str, typer.Option("--name", help="Unique name (letters, digits, . _ @ -), never reused.")
    ],
    expires: Annotated[
        int | None,
        typer.Option("--expires", min=1, max=3650, help="Days until it expires (default: never)."),
    ] = None,
    data_dir: DataDirOption = Path("stanzaguard-data"),
    config: ConfigOption = None,
) -> None:
    """Create an API token and print its secret: shown once, stored only as a hash. Audited."""
    from archive_api.auth import Role
    from archive_api.errors import ArchiveApiError
    from archive_api.store.errors import StoreError
    from stanzaguard import access, operations

    if role not in {r.value for r in Role}:
        raise _fail(StanzaGuardError("--role must be admin, officer or auditor"))
    try:
        issued = asyncio.run(
            access.create_token(
                operations.Paths(data_dir),
                name=name,
                role=Role(role),
                expires_days=expires,
                store_spec=_configured_store(config, data_dir),
            )
        )
    except (StanzaGuardError, StoreError, ArchiveApiError) as exc:
        raise _fail(exc) from None
    token = issued.token
    until = token.expires_at.strftime("%Y-%m-%d %H:%M UTC") if token.expires_at else "never"
    err.print(
        f"token {token.name!r} (role {token.role}, expires {until}) created; its secret is "
        "below and will not be shown again:",
        highlight=False,
    )
    typer.echo(issued.secret)


@token_app.command("list")
def token_list(
    data_dir: DataDirOption = Path("stanzaguard-data"),
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
    config: ConfigOption = None,
) -> None:
    """List API tokens (names, roles, dates, state); secrets are never stored, so never shown."""
    from archive_api.auth import token_state
    from archive_api.store.errors import StoreError
    from stanzaguard import access, operations

    try:
        store_spec = _configured_store(config, data_dir)
        tokens = asyncio.run(access.list_tokens(operations.Paths(data_dir), store_spec))
    except (StanzaGuardError, StoreError) as exc:
        raise _fail(exc) from None
    now = datetime.now(UTC)

    def when(at: datetime | None) -> str | None:
        return at.isoformat() if at is not None else None

    if as_json:
        for t in tokens:
            row = {
                "name": t.name,
                "role": t.role,
                "state": token_state(t, now),
                "created_at": when(t.created_at),
                "expires_at": when(t.expires_at),
                "revoked_at": when(t.revoked_at),
            }
            typer.echo(json.dumps(row, ensure_ascii=False))
        return
    table = Table("name", "role", "state", "created (UTC)", "expires (UTC)", "revoked (UTC)")
    for t in tokens:
        table.add_row(
            t.name,
            t.role,
            token_state(t, now),
            *(
                at.strftime("%Y-%m-%d %H:%M") if at is not None else ""
                for at in (t.created_at, t.expires_at, t.revoked_at)
            ),
        )
    Console().print(table)
    err.print(f"{len(tokens)} token(s)")


@token_app.command("revoke")
def token_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    data_dir: DataDirOption = Path("stanzaguard-data"),
    config: ConfigOption = None,
) -> None:
    """Revoke an API token at once (its UI sessions end with it). Audited."""
    from archive_api.errors import ArchiveApiError
    from archive_api.store.errors import StoreError
    from stanzaguard import access, operations

    try:
        store_spec = _configured_store(config, data_dir)
        token = asyncio.run(access.revoke_token(operations.Paths(data_dir), name, store_spec))
    except (StanzaGuardError, StoreError, ArchiveApiError) as exc:
        raise _fail(exc) from None
    assert token.revoked_at is not None
    typer.echo(f"token {token.name!r} revoked at {token.revoked_at.isoformat()}")


# -- end of API token commands ------------------------------------------------------------------


# -- the published block list (stanzaguard/rtbl_publishing.py; docs/rtbl-publishing.md) --------

rtbl_app = typer.Typer(
    help="The block list StanzaGuard publishes: list entries, approve, reject, add, retract.",
    no_args_is_help=True,
)
app.add_typer(rtbl_app, name="rtbl")


@rtbl_app.command("list")
def rtbl_list(
    config: ConfigOption = None,
    data_dir: Annotated[Path | None, typer.Option(help="The service's data directory.")] = None,
    state: Annotated[
        str | None, typer.Option(help="pending, listed, rejected or retracted (default: all).")
    ] = None,
    kind: Annotated[str | None, typer.Option(help="domain or jid (default: both).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
) -> None:
    """Entries of the published block list with their state (pending ones await approval)."""
    from archive_api.store.errors import StoreError
    from classifier.listing import EntryKind, EntryState
    from stanzaguard.rtbl_publishing import cli_entries

    try:
        wanted_state = EntryState(state) if state is not None else None
        wanted_kind = EntryKind(kind) if kind is not None else None
    except ValueError as exc:
        raise _fail(StanzaGuardError(str(exc))) from None
    try:
        settings = load_settings(config, data_dir=data_dir)
        entries = asyncio.run(cli_entries(settings, wanted_state, wanted_kind))
    except (StanzaGuardError, StoreError, ValueError) as exc:
        raise _fail(exc) from None
    if as_json:
        for entry in entries:
            typer.echo(json.dumps(entry.to_json(), ensure_ascii=False))
        return
    table = Table("kind", "entry", "state", "by", "updated (UTC)", "reason")
    for entry in entries:
        table.add_row(
            entry.kind,
            entry.value,
            entry.state,
            entry.actor or entry.origin,
            entry.updated.strftime("%Y-%m-%d %H:%M"),
            entry.reason,
        )
    Console(width=200).print(table)
    err.print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")


@rtbl_app.command("decide")
def rtbl_decide(
    kind: Annotated[str, typer.Argument(help="domain or jid.")],
    value: Annotated[str, typer.Argument(help="The domain, or the bare JID.")],
    decision: Annotated[str, typer.Argument(help="approve, reject, add or retract.")],
    reason: Annotated[str | None, typer.Option(help="Why (recorded with the entry).")] = None,
    config: ConfigOption = None,
    data_dir: Annotated[Path | None, typer.Option(help="The service's data directory.")] = None,
) -> None:
    """Approve, reject, add or retract one entry. Audited; published by the running service."""
    from archive_api.errors import ArchiveApiError
    from archive_api.store.errors import StoreError
    from classifier.listing import Decision, EntryKind
    from stanzaguard.rtbl_publishing import cli_decide

    try:
        entry_kind, entry_decision = EntryKind(kind), Decision(decision)
    except ValueError as exc:
        raise _fail(StanzaGuardError(str(exc))) from None
    try:
        settings = load_settings(config, data_dir=data_dir)
        changed = asyncio.run(cli_decide(settings, entry_kind, value, entry_decision, reason))
    except (StanzaGuardError, StoreError, ArchiveApiError, ValueError) as exc:
        raise _fail(exc) from None
    for entry in changed:
        typer.echo(f"{entry.kind} {entry.value}: {entry.state} ({entry.reason})")


# -- end of the published block list commands ---------------------------------------------------


# -- retention purge and exports (stanzaguard/retention_ops.py; docs/retention.md) --------------


@app.command()
def purge(
    data_dir: DataDirOption = Path("stanzaguard-data"),
    retention: Annotated[
        Path | None,
        typer.Option(
            "--retention",
            envvar="STANZAGUARD_RETENTION",
            help="Retention policy (TOML with \\[retention]): classify new records first.",
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            envvar="STANZAGUARD_POLICY",
            help="Policy file whose \\[groups] the retention rules name.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only report what would be purged (audited).")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Purge records past their retention that no legal hold covers; every batch is audited.

    With --retention, records without a retention class get one first, and records due for
    purge are re-checked against the policy (retention only ever grows). A purged record
    leaves a tombstone in the chain, so `stanzaguard verify` still passes.
    """
    from archive_api.errors import ArchiveApiError
    from archive_api.store.errors import StoreError
    from stanzaguard import operations, retention_ops
    from stanzaguard.clock import SystemClock

    try:
        settings = load_settings(config, data_dir=data_dir)
        rules = (
            retention_ops.load_retention(retention, policy, frozenset(settings.domain))
            if retention
            else None
        )
        store_spec = _configured_store(config, data_dir)
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), console=err, transient=True
        ) as progress:
            task = progress.add_task("purging", total=None)
            outcome = asyncio.run(
                retention_ops.purge(
                    operations.Paths(data_dir),
                    clock=SystemClock(),
                    retention=rules,
                    dry_run=dry_run,
                    progress=lambda n: progress.update(task, description=f"purged {n}"),
                    store_spec=store_spec,
                )
            )
    except (StanzaGuardError, StoreError, ArchiveApiError) as exc:
        raise _fail(exc) from None
    if retention is None:
        err.print("no --retention given: only expiries already recorded count")
    for what, applied in (("classified", outcome.classified), ("re-checked", outcome.rechecked)):
        if applied is not None and applied.examined:
            update = applied.update
            typer.echo(
                f"{what} {applied.examined} record(s): {update.assigned} assigned, "
                f"{update.extended} extended, {update.kept} kept"
            )
    verb = "would purge" if dry_run else "purged"
    classes = ", ".join(f"{name}: {n}" for name, n in sorted(outcome.by_class.items()))
    typer.echo(f"{verb} {outcome.purged} record(s)" + (f" ({classes})" if classes else ""))
    if outcome.held_back:
        typer.echo(f"{outcome.held_back} record(s) past retention kept by legal holds")
    if outcome.skipped:
        typer.echo(f"{len(outcome.skipped)} planned record(s) were held or extended meanwhile")


@app.command()
def export(
    out: Annotated[
        Path, typer.Option("--out", help="A new or empty directory for the files and manifest.")
    ],
    query: Annotated[
        str | None, typer.Option("--query", help="Export what this search matches.")
    ] = None,
    hold: Annotated[
        str | None, typer.Option("--hold", help="Export what this legal hold (its id) covers.")
    ] = None,
    export_format: Annotated[
        str, typer.Option("--format", help="jsonl, csv, eml or pdf.")
    ] = "jsonl",
    data_dir: DataDirOption = Path("stanzaguard-data"),
    config: ConfigOption = None,
) -> None:
    """Export a search or a legal hold, with manifest.json (sha256 of every file). Audited."""
    from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn

    from archive_api.errors import ArchiveApiError
    from archive_api.store.errors import StoreError
    from stanzaguard import operations, retention_ops
    from stanzaguard.clock import SystemClock

    try:
        store_spec = _configured_store(config, data_dir)
        with Progress(
            SpinnerColumn(),
            TextColumn("exporting"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
        ) as progress:
            task = progress.add_task("export", total=None)
            result = asyncio.run(
                retention_ops.export(
                    operations.Paths(data_dir),
                    clock=SystemClock(),
                    out=out,
                    export_format=export_format,
                    query=query,
                    hold_id=hold,
                    progress=lambda done, total: progress.update(task, completed=done, total=total),
                    store_spec=store_spec,
                )
            )
    except (StanzaGuardError, StoreError, ArchiveApiError) as exc:
        raise _fail(exc) from None
    typer.echo(
        f"exported {result.record_count} record(s) as {result.format.value} into "
        f"{result.directory} ({len(result.files)} file(s) and manifest.json)"
    )


# -- end of retention purge and export commands -------------------------------------------------


# -- distributed mode: Celery worker and beat (docs/distributed.md) ------------------------------


@app.command()
def worker(
    config: ConfigOption = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Data directory (the SQLite store lives there).")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Broker and result backend, redis://HOST:PORT/DB.")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, max=256, help="Worker processes (worker_concurrency).")
    ] = None,
    pool: Annotated[
        str, typer.Option(help="'prefork' (default) or 'solo' (one process, for debugging).")
    ] = "prefork",
) -> None:
    """Run a Celery worker that indexes the proxies' spool batches into the archive store."""
    from stanzaguard.celery_app import build_celery_app

    if pool not in ("prefork", "solo"):
        raise _fail(StanzaGuardError("--pool: give 'prefork' or 'solo'"))
    try:
        settings = load_settings(
            config, data_dir=data_dir, redis_url=redis_url, worker_concurrency=concurrency
        )
        configure_logging(settings.log_level, settings.log_format)
        celery_app = build_celery_app(settings)
    except StanzaGuardError as exc:
        raise _fail(exc) from None
    celery_app.worker_main(
        [
            "worker",
            f"--concurrency={settings.worker_concurrency}",
            f"--pool={pool}",
            f"--loglevel={settings.log_level.upper()}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


@app.command()
def beat(
    config: ConfigOption = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory.")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Broker, redis://HOST:PORT/DB.")] = None,
) -> None:
    """Run Celery beat: retention rounds, audit checkpoints, block-list downloads, retrains."""
    from stanzaguard.celery_app import build_celery_app

    try:
        settings = load_settings(config, data_dir=data_dir, redis_url=redis_url)
        configure_logging(settings.log_level, settings.log_format)
        celery_app = build_celery_app(settings)
    except StanzaGuardError as exc:
        raise _fail(exc) from None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    schedule_file = settings.data_dir / "celerybeat-schedule"
    celery_app.start(
        ["beat", f"--loglevel={settings.log_level.upper()}", f"--schedule={schedule_file}"]
    )


# -- end of distributed mode ---------------------------------------------------------------------


if __name__ == "__main__":
    app()
