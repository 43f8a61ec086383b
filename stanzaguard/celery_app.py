"""The Celery app of distributed mode, built from the settings (docs/distributed.md).

`archive_api.tasks` defines the indexing task and the app's safe defaults; this module gives
it what only the composition root knows: how a worker opens the archive store, and the jobs
Celery beat schedules (retention rounds).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from celery import Celery

from archive_api.store.base import ArchiveStore
from archive_api.tasks import create_celery_app
from stanzaguard.clock import SystemClock
from stanzaguard.errors import SettingsError
from stanzaguard.operations import Paths
from stanzaguard.retention_job import RetentionJob
from stanzaguard.settings import Settings
from stanzaguard.stores import open_store_spec, spec_from_settings

RETENTION_ROUND = "stanzaguard.retention_round"


def redis_url(settings: Settings) -> str:
    if settings.redis_url is None:
        raise SettingsError("redis_url: required for Celery (indexing=celery, worker, beat)")
    return settings.redis_url.get_secret_value()


def build_celery_app(settings: Settings) -> Celery:
    """The app for shippers, workers and beat alike; a shipper never calls the opener."""
    paths = Paths(settings.data_dir, settings.evidence_dir or settings.data_dir / "evidence")

    async def open_store() -> ArchiveStore:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return await open_store_spec(spec_from_settings(settings, paths.store))

    schedule: dict[str, dict[str, Any]] = {}
    if settings.retention_file is not None:
        schedule["retention"] = {
            "task": RETENTION_ROUND,
            "schedule": timedelta(seconds=settings.retention_interval),
        }
    # TODO(issue 6): RTBL refresh and scheduled retraining as beat entries.
    app = create_celery_app(
        redis_url(settings),
        store_opener=open_store,
        visibility_timeout=max(3600.0, settings.index_task_timeout * 4),
        beat_schedule=schedule,
    )

    @app.task(name=RETENTION_ROUND, acks_late=True)
    def retention_round() -> dict[str, int]:
        """One retention round (`stanzaguard purge` as system:retention); see retention_job."""
        if settings.retention_file is None:
            return {"purged": 0, "held_back": 0}
        job = RetentionJob(
            paths,
            settings.retention_file,
            policy_file=settings.policy,
            clock=SystemClock(),
            interval=settings.retention_interval,
            purge_due=settings.retention_purge,
        )
        outcome = asyncio.run(job.run_once())
        return {"purged": outcome.purged, "held_back": outcome.held_back}

    return app
