"""Settings of the RTBL subscriber and block-list files, and what production refuses."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.rtbl import TlsMode
from stanzaguard.errors import SettingsError
from stanzaguard.settings import load_settings
from stanzaguard.wiring import ArchivingService, build_blocklist_files, build_rtbl_config
from tests.support.rtbl import eventually

NODES = "xmppbl.org/spam_source_domains, jid_sha256:pubsub.example.org/our_hashes"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("STANZAGUARD_"):
            monkeypatch.delenv(name)
    yield


def rtbl(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "rtbl_jid": "rtbl@corp.example",
        "rtbl_password": "a-long-random-password",
        "rtbl_nodes": ["xmppbl.org/spam_source_domains"],
    }
    values.update(overrides)
    return values


def test_rtbl_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANZAGUARD_RTBL_JID", "rtbl@corp.example")
    monkeypatch.setenv("STANZAGUARD_RTBL_PASSWORD", "a-long-random-password")
    monkeypatch.setenv("STANZAGUARD_RTBL_NODES", NODES)
    monkeypatch.setenv("STANZAGUARD_RTBL_SERVER", "xmpp.corp.example:5222")
    monkeypatch.setenv("STANZAGUARD_BLOCKLIST_FILES", "jabberspam:/etc/sg/blacklist.txt")
    settings = load_settings()
    assert "a-long-random-password" not in repr(settings)
    config = build_rtbl_config(settings)
    assert config is not None
    assert [n.source for n in config.nodes] == [
        "xmppbl.org/spam_source_domains",
        "pubsub.example.org/our_hashes",
    ]
    assert (config.host, config.port, config.tls) == ("xmpp.corp.example", 5222, TlsMode.STARTTLS)
    assert config.password == "a-long-random-password"
    assert "a-long-random-password" not in repr(config)
    files = build_blocklist_files(settings)
    assert [(f.format, f.source) for f in files] == [("jabberspam", "/etc/sg/blacklist.txt")]


def test_no_nodes_no_subscriber() -> None:
    assert build_rtbl_config(load_settings()) is None
    assert build_blocklist_files(load_settings()) == ()


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"rtbl_jid": None}, "rtbl_jid"),
        ({"rtbl_jid": "corp.example"}, "rtbl_jid"),
        ({"rtbl_password": None}, "rtbl_password: required"),
        ({"rtbl_password": "changeme"}, "rtbl_password: a default or placeholder"),
        ({"rtbl_password": ""}, "rtbl_password: a default or placeholder"),
        ({"rtbl_tls": "plain"}, "rtbl_tls: plain is refused"),
        ({"rtbl_nodes": ["xmppbl.org/spam_source_ips"]}, "rtbl_nodes: .*not supported"),
        ({"rtbl_nodes": ["xmppbl.org/whatever"]}, "rtbl_nodes: .*unknown node name"),
    ],
)
def test_production_refuses(overrides: dict[str, Any], problem: str) -> None:
    with pytest.raises(SettingsError, match=problem):
        build_rtbl_config(load_settings(**rtbl(**overrides)))


def test_development_allows_placeholders_and_plain() -> None:
    config = build_rtbl_config(
        load_settings(**rtbl(environment="development", rtbl_password="changeme", rtbl_tls="plain"))
    )
    assert config is not None and config.tls is TlsMode.PLAIN


def test_bad_blocklist_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"blocklist_files: .*unknown format 'ips'"):
        build_blocklist_files(load_settings(blocklist_files=[f"ips:{tmp_path}/x.txt"]))


def _service_settings(tmp_path: Path, *files: str) -> Any:
    return load_settings(
        environment="development",
        allow_plaintext=True,
        domain=["localhost"],
        listen="127.0.0.1:0",
        data_dir=tmp_path / "data",
        blocklist_files=list(files),
    )


async def test_the_service_feeds_list_files_to_the_policy_and_reloads_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "blacklist.txt"
    path.write_text("spam.example\n")
    service = ArchivingService(_service_settings(tmp_path, f"jabberspam:{path}"))
    await service.start()
    try:
        blocklist = service.blocklist
        assert blocklist is not None and service.policy.blocklists is blocklist
        assert blocklist.entries("domains", source=str(path)) == ("spam.example",)
        replacement = tmp_path / "new.txt"
        replacement.write_text("spam.example\nmore.example\n")
        os.replace(replacement, path)
        await eventually(
            lambda: blocklist.match_domain("more.example") is not None, "the file reloaded"
        )
    finally:
        await service.stop()


async def test_a_missing_list_file_stops_start_up(tmp_path: Path) -> None:
    service = ArchivingService(_service_settings(tmp_path, f"domains:{tmp_path}/missing.txt"))
    with pytest.raises(SettingsError, match=r"blocklist_files: .*cannot read"):
        await service.start()
    await service.stop()
