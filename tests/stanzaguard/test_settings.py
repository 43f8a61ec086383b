"""Settings: precedence of CLI, environment and TOML; errors that name the bad key; dev-cert.

``load_settings`` is what ``stanzaguard run`` calls, so most tests call it directly; the CLI
tests run the real Typer app in-process (``CliRunner``) for the exit status and the message
an operator sees. No test here starts a server: every ``run`` below must fail before that.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from stanzaguard.cli import app
from stanzaguard.errors import SettingsError
from stanzaguard.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No STANZAGUARD_* of the developer's shell; the root logger as it was (run() sets it)."""
    for name in list(os.environ):
        if name.startswith("STANZAGUARD_"):
            monkeypatch.delenv(name)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- precedence ------------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = load_settings()
    assert settings.environment == "production"
    assert settings.domain == []
    assert settings.upstream == "127.0.0.1:5222"
    assert (settings.listen, settings.listen_tls) == ("0.0.0.0:5222", "0.0.0.0:5223")
    assert settings.allow_plaintext is False
    assert settings.max_stanza_bytes == 256 * 1024


def test_cli_beats_environment_beats_toml_beats_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_toml(
        tmp_path / "sg.toml",
        'upstream = "10.0.0.1:5222"\nlisten = "127.0.0.1:1111"\nmax_depth = 40\n'
        'domain = ["Corp.Example"]\n',
    )
    monkeypatch.setenv("STANZAGUARD_UPSTREAM", "10.0.0.2:5222")
    monkeypatch.setenv("STANZAGUARD_LISTEN", "127.0.0.1:2222")

    both = load_settings(config, upstream="10.0.0.3:5222")
    assert both.upstream == "10.0.0.3:5222"  # command line
    assert both.listen == "127.0.0.1:2222"  # environment over TOML
    assert both.max_depth == 40  # TOML over the default
    assert both.domain == ["corp.example"]  # lower-cased
    assert both.listen_tls == "0.0.0.0:5223"  # default

    monkeypatch.delenv("STANZAGUARD_UPSTREAM")
    assert load_settings(config).upstream == "10.0.0.1:5222"
    assert load_settings().upstream == "127.0.0.1:5222"  # the file applies only when given


def test_config_file_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_toml(tmp_path / "sg.toml", 'environment = "development"\n')
    monkeypatch.setenv("STANZAGUARD_CONFIG", str(config))
    assert load_settings().environment == "development"


def test_an_explicit_config_file_does_not_leak_into_the_environment(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "sg.toml", 'environment = "development"\n')
    assert load_settings(config).environment == "development"
    assert "STANZAGUARD_CONFIG" not in os.environ
    assert load_settings().environment == "production"


def test_domains_from_the_environment_are_comma_separated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As docs/configuration.md promises: STANZAGUARD_DOMAIN=corp.example,chat.corp.example
    monkeypatch.setenv("STANZAGUARD_DOMAIN", "Corp.Example, chat.corp.example")
    assert load_settings().domain == ["corp.example", "chat.corp.example"]
    assert load_settings(domain=["cli.example"]).domain == ["cli.example"]


def test_booleans_and_numbers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANZAGUARD_ALLOW_PLAINTEXT", "true")
    monkeypatch.setenv("STANZAGUARD_AUTH_TIMEOUT", "2.5")
    monkeypatch.setenv("STANZAGUARD_MAX_SESSIONS", "10")
    settings = load_settings()
    assert (settings.allow_plaintext, settings.auth_timeout, settings.max_sessions) == (
        True,
        2.5,
        10,
    )


# -- errors name the key ---------------------------------------------------------------------------


def test_bad_value_on_the_command_line_names_the_key() -> None:
    with pytest.raises(SettingsError, match=r"upstream: .*HOST:PORT, got 'nowhere'"):
        load_settings(upstream="nowhere")
    with pytest.raises(SettingsError, match=r"listen: .*port must be a number"):
        load_settings(listen="127.0.0.1:99999")


def test_bad_value_in_the_environment_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANZAGUARD_MAX_DEPTH", "deep")
    with pytest.raises(SettingsError, match=r"max_depth: "):
        load_settings()


def test_every_bad_key_is_named(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path / "sg.toml", 'max_depth = 1\nlog_level = "chatty"\nupstream = "x"\n'
    )
    with pytest.raises(SettingsError) as caught:
        load_settings(config)
    message = str(caught.value)
    for key in ("max_depth", "log_level", "upstream"):
        assert f"{key}: " in message, message


def test_unknown_key_in_toml_is_an_error(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "sg.toml", 'uptream = "127.0.0.1:5222"\n')
    with pytest.raises(SettingsError, match=r"uptream: Extra inputs are not permitted"):
        load_settings(config)


def test_malformed_toml(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "sg.toml", 'domain = ["corp.example"\nupstream = \n')
    with pytest.raises(SettingsError, match=r"cannot read settings: .*line"):
        load_settings(config)


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(SettingsError, match=r"nope\.toml does not exist"):
        load_settings(missing)


def test_settings_class_forbids_unknown_keys_directly() -> None:
    with pytest.raises(ValueError, match="bogus"):
        Settings(bogus=1)  # type: ignore[call-arg]


# -- `stanzaguard run` with bad options ------------------------------------------------------------


runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--domain", "localhost", "--upstream", "nowhere"], "upstream: "),
        (["--domain", "localhost", "--listen", "127.0.0.1:x"], "listen: "),
        (["--domain", "localhost", "--environment", "staging"], "environment: "),
        ([], "domain: at least one domain"),
        (["--domain", "localhost"], "cert/key: a certificate and key are required"),
        (["--domain", "localhost", "--cert", "/nonexistent.crt"], "cert/key: give both"),
        (
            ["--domain", "localhost", "--cert", "/nonexistent.crt", "--key", "/nonexistent.key"],
            "cert/key: cannot load",
        ),
        (["--domain", "localhost", "--allow-plaintext"], "allow_plaintext: refused outside"),
        (["--config", "/nonexistent/sg.toml", "--domain", "localhost"], "does not exist"),
    ],
    ids=[
        "upstream",
        "listen",
        "environment",
        "no-domain",
        "no-cert",
        "cert-without-key",
        "unreadable-cert",
        "plaintext-in-production",
        "missing-config",
    ],
)
def test_run_with_bad_options_exits_2_with_a_clear_message(
    args: list[str], expected: str, tmp_path: Path
) -> None:
    result = runner.invoke(app, ["run", "--data-dir", str(tmp_path / "data"), *args])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())  # rich wraps long lines
    assert output.startswith("error: ") and expected in output, output
    assert "Traceback" not in output
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_run_with_malformed_toml_exits_2(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "sg.toml", "domain = [\n")
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "cannot read settings" in " ".join(result.output.split())


def test_run_with_an_unknown_option_is_a_usage_error() -> None:
    result = runner.invoke(app, ["run", "--no-such-option"])
    assert result.exit_code == 2
    assert "No such option" in result.output


# -- dev-cert ----------------------------------------------------------------------------------


def test_dev_cert_makes_a_usable_pair(tmp_path: Path) -> None:
    result = runner.invoke(app, ["dev-cert", "corp.example", "--out", str(tmp_path / "tls")])
    assert result.exit_code == 0, result.output
    cert_path, key_path = (Path(line) for line in result.output.split())
    assert (cert_path, key_path) == (
        tmp_path / "tls" / "corp.example.crt",
        tmp_path / "tls" / "corp.example.key",
    )
    assert key_path.stat().st_mode & 0o077 == 0  # the key is private to its owner
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {
        "corp.example",
        "*.corp.example",
        "localhost",
    }
    # A server context loads it, so `run --cert … --key …` would accept the pair.
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_path, key_path)
