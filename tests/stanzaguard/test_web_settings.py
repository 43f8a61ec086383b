"""Settings of the WebSocket and BOSH listeners (docs/integrations/web-clients.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stanzaguard.errors import SettingsError
from stanzaguard.settings import load_settings
from stanzaguard.wiring import build_web_tls
from tests.support.certs import make_self_signed


def test_web_listeners_are_off_by_default_and_off_means_none() -> None:
    settings = load_settings(domain=["example.com"])
    assert (settings.listen_websocket, settings.listen_bosh) == (None, None)
    settings = load_settings(domain=["example.com"], listen_websocket="off", listen_bosh="OFF")
    assert (settings.listen_websocket, settings.listen_bosh) == (None, None)
    assert build_web_tls(settings) is None


def test_web_listeners_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANZAGUARD_LISTEN_WEBSOCKET", "127.0.0.1:5443")
    monkeypatch.setenv("STANZAGUARD_LISTEN_BOSH", "127.0.0.1:5281")
    monkeypatch.setenv("STANZAGUARD_BOSH_INACTIVITY", "30")
    settings = load_settings(domain=["example.com"])
    assert settings.listen_websocket == "127.0.0.1:5443"
    assert settings.listen_bosh == "127.0.0.1:5281"
    assert settings.bosh_inactivity == 30


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("listen_websocket", "nowhere", "listen_websocket"),
        ("listen_bosh", "127.0.0.1:99999", "listen_bosh"),
        ("bosh_max_wait", 0, "bosh_max_wait"),
        ("bosh_max_wait", 10_000, "bosh_max_wait"),
        ("bosh_inactivity", 1, "bosh_inactivity"),
    ],
)
def test_bad_web_settings_name_the_key(key: str, value: object, message: str) -> None:
    overrides: dict[str, Any] = {key: value}
    with pytest.raises(SettingsError, match=message):
        load_settings(domain=["example.com"], **overrides)


def test_web_tls_needs_a_certificate(tmp_path: Path) -> None:
    settings = load_settings(domain=["example.com"], listen_bosh="127.0.0.1:5281")
    with pytest.raises(SettingsError, match="web_tls"):
        build_web_tls(settings)
    # Behind a reverse proxy that terminates TLS, the listeners are plain.
    behind = load_settings(domain=["example.com"], listen_bosh="127.0.0.1:5281", web_tls=False)
    assert build_web_tls(behind) is None
    pair = make_self_signed(tmp_path, "example.com")
    served = load_settings(
        domain=["example.com"], listen_websocket="127.0.0.1:5443", cert=pair.cert, key=pair.key
    )
    context = build_web_tls(served)
    assert context is not None
