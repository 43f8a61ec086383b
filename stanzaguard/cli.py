"""The `stanzaguard` command."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from stanzaguard.errors import StanzaGuardError
from stanzaguard.logs import configure_logging
from stanzaguard.settings import load_settings
from stanzaguard.tls import write_dev_cert

app = typer.Typer(
    name="stanzaguard",
    help="Compliance-archiving and anti-SPIM proxy for XMPP.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)

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
        )
        configure_logging(settings.log_level, settings.log_format)
        asyncio.run(serve(settings))
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


if __name__ == "__main__":
    app()
