"""Celery beat's jobs (`stanzaguard.beat_tasks`): the schedule the settings make, and each job
run for real by a `stanzaguard worker` over a real redis-server.

The jobs are sent with `send_task` (what beat does on each tick) instead of waiting for beat's
ticks; that beat publishes them at the configured intervals is checked on the schedule it is
given. Block lists are downloaded from a real HTTP server on loopback, and the file the job
writes is read back by the proxies' own `BlocklistFileWatcher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from archive_api.audit import AuditAction
from archive_api.store.sqlite import SqliteStore
from archive_api.tasks import create_celery_app
from classifier.blocklists import MAX_LIST_TEXT, BlockList
from classifier.clock import ManualClock
from proxy.blocklist_files import BlocklistFileWatcher, parse_list_file_spec
from stanzaguard.beat_tasks import (
    AUDIT_CHECKPOINT,
    BLOCKLIST_REFRESH,
    RETENTION_ROUND,
    RETRAIN,
    beat_schedule,
    refresh_blocklists,
)
from stanzaguard.celery_app import build_celery_app
from stanzaguard.errors import SettingsError
from stanzaguard.keys import load_or_create_signer
from stanzaguard.registry import ModelRegistry
from stanzaguard.settings import Settings, load_settings
from tests.stanzaguard.test_purge_cli import audit_events, remaining
from tests.stanzaguard.test_purge_cli import data_dir as purge_data_dir
from tests.support.redis import running_redis
from tests.support.services import ManagedProcess, start_process
from tests.support.textdata import sms_collection

__all__ = ["purge_data_dir"]  # the fixture: a data directory with records, a hold, keys

REDIS = "redis://127.0.0.1:1/0"  # building an app connects nowhere


# -- the schedule -------------------------------------------------------------------------------


def test_the_default_schedule_signs_the_audit_log_hourly_and_changes_nothing_else() -> None:
    schedule = beat_schedule(load_settings(redis_url=REDIS))
    assert set(schedule) == {"audit-checkpoint"}
    assert schedule["audit-checkpoint"]["task"] == AUDIT_CHECKPOINT
    assert schedule["audit-checkpoint"]["schedule"] == timedelta(hours=1)


def test_the_schedule_holds_every_configured_job_at_its_interval(tmp_path: Path) -> None:
    settings = load_settings(
        redis_url=REDIS,
        environment="development",
        retention_file=tmp_path / "retention.toml",
        retention_interval=600,
        audit_checkpoint_interval=900,
        blocklist_files=[f"domains:{tmp_path / 'spam.txt'}"],
        blocklist_downloads=[f"{tmp_path / 'spam.txt'}=https://lists.example/spam.txt"],
        blocklist_refresh_interval=1800,
        retrain_interval=86400,
    )
    app = build_celery_app(settings)
    schedule = app.conf.beat_schedule
    assert {name: (entry["task"], entry["schedule"]) for name, entry in schedule.items()} == {
        "retention": (RETENTION_ROUND, timedelta(seconds=600)),
        "audit-checkpoint": (AUDIT_CHECKPOINT, timedelta(seconds=900)),
        "blocklist-refresh": (BLOCKLIST_REFRESH, timedelta(seconds=1800)),
        "retrain": (RETRAIN, timedelta(days=1)),
    }
    # A run still queued when the next is due is dropped, not run twice in a row.
    assert schedule["retrain"]["options"] == {"expires": 86400}
    # The worker's app knows every task beat sends.
    assert {RETENTION_ROUND, AUDIT_CHECKPOINT, BLOCKLIST_REFRESH, RETRAIN} <= set(app.tasks)


def test_audit_checkpoints_on_the_elasticsearch_store_too() -> None:
    settings = load_settings(redis_url=REDIS, store="elasticsearch", es_url="http://127.0.0.1:9200")
    assert set(beat_schedule(settings)) == {"audit-checkpoint"}


def test_an_interval_of_zero_leaves_a_job_out(tmp_path: Path) -> None:
    settings = load_settings(
        redis_url=REDIS,
        audit_checkpoint_interval=0,
        blocklist_files=[f"domains:{tmp_path / 'spam.txt'}"],
        blocklist_downloads=[f"{tmp_path / 'spam.txt'}=https://lists.example/spam.txt"],
        blocklist_refresh_interval=0,
    )
    assert beat_schedule(settings) == {}


@pytest.mark.parametrize(
    ("downloads", "why"),
    [
        (["no-equals-sign"], "is not PATH=URL"),
        (["=https://lists.example/x"], "is not PATH=URL"),
        (["/srv/lists/spam.txt="], "is not PATH=URL"),
        (["/srv/lists/other.txt=https://lists.example/x"], "not in blocklist_files"),
        (["/srv/lists/spam.txt=http://lists.example/x"], "must be https://"),
        (["/srv/lists/spam.txt=ftp://lists.example/x"], "must be https://"),
        (["/srv/lists/spam.txt=file:///etc/passwd"], "must be https://"),
        (["/srv/lists/spam.txt=https://lists.example/\x00x"], "not printable"),
        ([f"/srv/lists/spam.txt=https://lists.example/{'x' * 3000}"], "too long"),
    ],
)
def test_bad_blocklist_downloads_are_refused(downloads: list[str], why: str) -> None:
    with pytest.raises(SettingsError, match=why):
        load_settings(
            blocklist_files=["domains:/srv/lists/spam.txt"], blocklist_downloads=downloads
        )


@pytest.mark.parametrize(
    "bad",
    [
        {"audit_checkpoint_interval": -1},
        {"blocklist_refresh_interval": -5},
        {"retrain_interval": -1},
        {"retrain_folds": 1},
        {"retrain_folds": 1000},
    ],
)
def test_bad_intervals_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(SettingsError):
        load_settings(**bad)


# -- block-list downloads against a real HTTP server -------------------------------------------


class ListServer:
    """A loopback HTTP server answering each path with what the test put there."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[int, bytes]] = {}
        pages = self.pages

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = pages.get(self.path, (404, b"not found"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"


@pytest.fixture
def list_server() -> Iterator[ListServer]:
    server = ListServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


def list_settings(tmp_path: Path, server: ListServer, fmt: str = "domains") -> Settings:
    path = tmp_path / "lists" / "spam.txt"
    path.parent.mkdir(exist_ok=True)
    return load_settings(
        environment="development",
        blocklist_files=[f"{fmt}:{path}"],
        blocklist_downloads=[f"{path}={server.url('/spam.txt')}"],
    )


def test_a_download_replaces_the_list_only_when_it_parses(
    tmp_path: Path, list_server: ListServer
) -> None:
    settings = list_settings(tmp_path, list_server)
    (spec,) = settings.blocklist_files
    file = parse_list_file_spec(spec)
    key = str(file.path)
    list_server.pages["/spam.txt"] = (200, b"# v1\nspam.example\nabuse.example\n")
    assert refresh_blocklists(settings) == {key: "updated: 2 entries"}
    # The proxies' watcher loads what the job published.
    blocklist = BlockList()
    watcher = BlocklistFileWatcher([file], blocklist)
    watcher.load_all()
    assert blocklist.match_domain("spam.example") is not None
    assert refresh_blocklists(settings) == {key: "unchanged"}

    hostile: list[tuple[int, bytes]] = [
        (200, b"<html><body>Service unavailable</body></html>\n"),  # an error page
        (200, b"spam.example\n\xff\xfe not utf-8\n"),
        (200, b"x" * (MAX_LIST_TEXT + 1)),
        (500, b"spam.example\n"),
        (302, b""),
    ]
    for status, body in hostile:
        list_server.pages["/spam.txt"] = (status, body)
        outcome = refresh_blocklists(settings)[key]
        assert outcome.startswith("failed: "), (status, body[:40], outcome)
        assert file.path.read_bytes() == b"# v1\nspam.example\nabuse.example\n"
        assert not list(file.path.parent.glob(".*download"))  # no staging file left behind
    assert watcher.check() == 0  # nothing for the proxies to reload

    list_server.pages["/spam.txt"] = (200, b"# v2\nnew-spam.example\n")
    assert refresh_blocklists(settings) == {key: "updated: 1 entries"}
    assert watcher.check() == 1
    assert blocklist.match_domain("new-spam.example") is not None
    assert blocklist.match_domain("abuse.example") is None


def test_an_unreachable_list_server_is_a_failure_not_an_empty_list(tmp_path: Path) -> None:
    path = tmp_path / "spam.txt"
    path.write_text("spam.example\n")
    settings = load_settings(
        environment="development",
        blocklist_files=[f"domains:{path}"],
        blocklist_downloads=[f"{path}=http://127.0.0.1:1/spam.txt"],
    )
    assert refresh_blocklists(settings)[str(path)].startswith("failed: ")
    assert path.read_text() == "spam.example\n"


# -- every job through a real worker ------------------------------------------------------------


def start_worker(data_dir: Path, redis_url: str, log: Path, env: dict[str, str]) -> ManagedProcess:
    environment = dict(
        os.environ, STANZAGUARD_LOG_FORMAT="text", STANZAGUARD_LOG_LEVEL="info", **env
    )
    return start_process(
        [
            sys.executable,
            "-m",
            "stanzaguard.cli",
            "worker",
            "--data-dir",
            str(data_dir),
            "--redis-url",
            redis_url,
            "--concurrency",
            "1",
        ],
        log_path=log,
        env=environment,
    )


@contextlib.contextmanager
def worker_on_redis(tmp_path: Path, data_dir: Path, env: dict[str, str]) -> Iterator[Any]:
    with running_redis(tmp_path / "redis") as redis_server:
        worker = start_worker(data_dir, redis_server.url, tmp_path / "worker.log", env)
        try:
            yield create_celery_app(redis_server.url)
        finally:
            worker.stop()


def run_task(app: Any, name: str, timeout: float = 120.0) -> Any:
    return app.send_task(name).get(timeout=timeout)


@pytest.mark.integration
def test_every_beat_job_runs_in_a_worker(
    tmp_path: Path, purge_data_dir: Path, list_server: ListServer
) -> None:
    data_dir = purge_data_dir
    lists = tmp_path / "lists"
    lists.mkdir()
    base = tmp_path / "sms-slice.txt"
    base.write_bytes(b"\n".join(sms_collection().read_bytes().split(b"\n")[:400]) + b"\n")
    list_server.pages["/spam.txt"] = (200, b"spam.example\n")
    env = {
        "STANZAGUARD_ENVIRONMENT": "development",
        "STANZAGUARD_RETENTION_FILE": str(data_dir.parent / "retention.toml"),
        "STANZAGUARD_BLOCKLIST_FILES": f"domains:{lists / 'spam.txt'}",
        "STANZAGUARD_BLOCKLIST_DOWNLOADS": f"{lists / 'spam.txt'}={list_server.url('/spam.txt')}",
        "STANZAGUARD_RETRAIN_BASE": str(base),
        "STANZAGUARD_RETRAIN_FOLDS": "2",
        "STANZAGUARD_RETRAIN_ACTIVATE": "true",
    }
    with worker_on_redis(tmp_path, data_dir, env) as app:
        # Retention: the same round as `stanzaguard purge`, as the system, holds winning.
        assert run_task(app, RETENTION_ROUND) == {"purged": 3, "held_back": 1}
        assert remaining(data_dir) == {"m1", "d1"}
        assert audit_events(data_dir, AuditAction.PURGE)[-1].actor == "system:retention"

        # The audit log's head (the purge's events) signed with the data directory's key.
        head = run_task(app, AUDIT_CHECKPOINT)
        assert head > 0

        # A block list published where the proxies watch it.
        assert run_task(app, BLOCKLIST_REFRESH) == {str(lists / "spam.txt"): "updated: 1 entries"}
        assert (lists / "spam.txt").read_bytes() == b"spam.example\n"

        # A retrain: a new version, activated as configured.
        outcome = run_task(app, RETRAIN, timeout=300)
        assert outcome["activated"] is True
        registry = ModelRegistry.of(data_dir, ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
        assert registry.read_state().active == outcome["version"]

    async def audit_state() -> tuple[list[int], bool]:
        async with await SqliteStore.open(data_dir / "archive.sqlite3") as store:
            checkpoints = [c.seq for c in await store.audit_checkpoints()]
            key = load_or_create_signer(data_dir / "keys").public_key
            report = await store.verify_audit(public_key=key)
            return checkpoints, bool(report.ok)

    checkpoints, verified = asyncio.run(audit_state())
    assert head in checkpoints
    assert verified
