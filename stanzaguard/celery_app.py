"""The Celery app of distributed mode, built from the settings (docs/distributed.md).

`archive_api.tasks` defines the indexing task and the app's safe defaults; this module gives
it what only the composition root knows: how a worker opens the archive store, and the jobs
Celery beat schedules (`stanzaguard.beat_tasks`: retention, audit checkpoints, block-list
downloads, retraining).
"""

from __future__ import annotations

from celery import Celery

from archive_api.store.base import ArchiveStore
from archive_api.tasks import create_celery_app
from stanzaguard.beat_tasks import beat_schedule, register_beat_tasks
from stanzaguard.errors import SettingsError
from stanzaguard.operations import Paths
from stanzaguard.settings import Settings
from stanzaguard.stores import open_store_spec, spec_from_settings


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

    app = create_celery_app(
        redis_url(settings),
        store_opener=open_store,
        visibility_timeout=max(3600.0, settings.index_task_timeout * 4),
        beat_schedule=beat_schedule(settings),
    )
    register_beat_tasks(app, settings, paths)
    return app
