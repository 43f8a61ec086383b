"""The jobs Celery beat schedules in distributed mode, and the schedule itself.

`stanzaguard beat` only publishes these tasks on their intervals; `stanzaguard worker`
processes run them, with the worker's settings and data directory. Each interval is a
setting, and 0 leaves the job out of the schedule:

- ``retention_round`` (`retention_interval`, only when `retention_file` is set): one round of
  `stanzaguard purge` as ``system:retention`` (`stanzaguard.retention_job`).
- ``audit_checkpoint`` (`audit_checkpoint_interval`, default hourly): sign the audit log's
  head with the data directory's key, so a quiet hour still ends with a signed head (on
  whichever store the settings choose). The
  spool chains are not signed here: each proxy signs its own chain with the key on its own
  volume (every `checkpoint_every` entries and at every seal) and its shipper sends those
  checkpoints to the store (`add_checkpoints`); a central job holding every proxy's key
  would defeat the point of per-proxy keys.
- ``blocklist_refresh`` (`blocklist_refresh_interval`, only with `blocklist_downloads`):
  download each ``PATH=URL``, check it strictly as the proxies will parse it, and replace
  PATH atomically when it changed. That is the published version: the proxies already
  watch their `blocklist_files` and reload a changed file (`proxy.blocklist_files`). A
  download that fails or does not parse leaves the previous file in force. RTBL pubsub nodes
  are not refreshed here: every proxy subscribes to them itself, gets each item as it is
  published and fetches all items again whenever it reconnects (`proxy.rtbl`), so a beat
  job would add nothing but a second, slower path.
- ``retrain`` (`retrain_interval`, off by default: it changes the model): `stanzaguard
  retrain` on the data directory's labelled examples; the new version is activated only
  with `retrain_activate`, in the name of ``system:retrain``.

Jobs that use the data directory (retrain, block-list files, the signing key) need it shared
with the proxies or the API service that use the result (docs/distributed.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import timedelta
from typing import Any

import httpx
from celery import Celery

from archive_api.audit import AuditLog
from classifier.blocklists import MAX_LIST_TEXT
from proxy.blocklist_files import BlocklistFileError, ListFile, parse_list_file_spec, read_list_file
from stanzaguard.clock import SystemClock
from stanzaguard.errors import StanzaGuardError
from stanzaguard.keys import load_or_create_signer
from stanzaguard.operations import Paths
from stanzaguard.retention_job import RetentionJob
from stanzaguard.settings import Settings
from stanzaguard.stores import open_store_spec, spec_from_settings

log = logging.getLogger(__name__)

RETENTION_ROUND = "stanzaguard.retention_round"
AUDIT_CHECKPOINT = "stanzaguard.audit_checkpoint"
BLOCKLIST_REFRESH = "stanzaguard.blocklist_refresh"
RETRAIN = "stanzaguard.retrain"

#: Who activates a scheduled retrain's version (in the registry's activation history).
RETRAIN_ACTOR = "system:retrain"
#: Seconds one block-list download may take.
DOWNLOAD_TIMEOUT = 60.0


class BlocklistDownloadError(StanzaGuardError):
    """A block-list download failed or did not parse; the previous file stays in force."""


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery beat's entries from the settings (an interval of 0 leaves a job out).

    Each entry expires after its interval: a run still queued when the next is due (no
    worker for a while) is dropped rather than run twice in a row.
    """

    def every(task: str, seconds: float) -> dict[str, Any]:
        return {
            "task": task,
            "schedule": timedelta(seconds=seconds),
            "options": {"expires": seconds},
        }

    schedule: dict[str, dict[str, Any]] = {}
    if settings.retention_file is not None and settings.retention_interval > 0:
        schedule["retention"] = every(RETENTION_ROUND, settings.retention_interval)
    if settings.audit_checkpoint_interval > 0:
        schedule["audit-checkpoint"] = every(AUDIT_CHECKPOINT, settings.audit_checkpoint_interval)
    if settings.blocklist_downloads and settings.blocklist_refresh_interval > 0:
        schedule["blocklist-refresh"] = every(
            BLOCKLIST_REFRESH, settings.blocklist_refresh_interval
        )
    if settings.retrain_interval > 0:
        schedule["retrain"] = every(RETRAIN, settings.retrain_interval)
    return schedule


# --- the jobs ----------------------------------------------------------------------------------


async def sign_audit_head(settings: Settings, paths: Paths) -> int:
    """Sign the audit log's head with the data directory's key; its seq (0: empty log)."""
    store = await open_store_spec(spec_from_settings(settings, paths.store))
    try:
        audit = AuditLog(store, load_or_create_signer(paths.keys), SystemClock())
        checkpoint = await audit.checkpoint()
        return 0 if checkpoint is None else checkpoint.seq
    finally:
        await store.close()


def _download(client: httpx.Client, url: str) -> bytes:
    try:
        with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise BlocklistDownloadError(f"{url}: HTTP status {response.status_code}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_LIST_TEXT:
                    raise BlocklistDownloadError(f"{url}: larger than {MAX_LIST_TEXT} bytes")
            return bytes(body)
    except httpx.HTTPError as exc:
        raise BlocklistDownloadError(f"{url}: {type(exc).__name__}: {exc}") from None


def refresh_list_file(client: httpx.Client, file: ListFile, url: str) -> str:
    """Download `url` into `file` if it parses strictly and differs; say what happened.

    The new text goes to a temporary file beside the list, is parsed there exactly as the
    proxies parse it, fsync'd and renamed over the list: a proxy reads the old version or
    the new one, never half of one, and never a version that does not parse.

    Raises:
        BlocklistDownloadError: the download failed or its text is not a valid list.
    """
    body = _download(client, url)
    try:
        if file.path.read_bytes() == body:
            return "unchanged"
    except OSError:
        pass  # not there yet
    staging = file.path.with_name(f".{file.path.name}.download")
    try:
        with staging.open("wb") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        entries = read_list_file(ListFile(file.format, staging))
        os.replace(staging, file.path)
    except BlocklistFileError as exc:
        raise BlocklistDownloadError(f"{url}: {exc}") from None
    except OSError as exc:
        raise BlocklistDownloadError(f"{file.path}: cannot write: {exc.strerror}") from None
    finally:
        staging.unlink(missing_ok=True)
    return f"updated: {len(entries)} entries"


def refresh_blocklists(settings: Settings, client: httpx.Client | None = None) -> dict[str, str]:
    """Every `blocklist_downloads` entry once: PATH -> "unchanged", "updated: N entries" or
    "failed: why". One failure does not stop the others."""
    files = {str(f.path): f for f in map(parse_list_file_spec, settings.blocklist_files)}
    outcome: dict[str, str] = {}
    own_client = client is None
    client = client or httpx.Client(timeout=DOWNLOAD_TIMEOUT, follow_redirects=False)
    try:
        for download in settings.blocklist_downloads:
            path, _, url = download.partition("=")
            try:
                outcome[path] = refresh_list_file(client, files[path], url)
            except BlocklistDownloadError as exc:
                log.error("block-list download failed; the previous file stays: %s", exc)
                outcome[path] = f"failed: {str(exc)[:300]}"
    finally:
        if own_client:
            client.close()
    return outcome


def scheduled_retrain(settings: Settings) -> dict[str, Any]:
    """`stanzaguard retrain` on the data directory (imported on use: scikit-learn)."""
    from stanzaguard.retrain import retrain

    outcome = retrain(
        settings.data_dir,
        clock=SystemClock(),
        command="stanzaguard beat (scheduled retrain)",
        base_path=settings.retrain_base,
        folds=settings.retrain_folds,
        activate_as=RETRAIN_ACTOR if settings.retrain_activate else None,
    )
    return {
        "version": outcome.version,
        "activated": outcome.activation is not None,
        "examples": outcome.training.examples,
    }


def register_beat_tasks(app: Celery, settings: Settings, paths: Paths) -> None:
    """Add the jobs to a worker's app (`stanzaguard.celery_app.build_celery_app`)."""

    @app.task(name=RETENTION_ROUND, shared=False, acks_late=True)
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
            store_spec=spec_from_settings(settings, paths.store),
            local_domains=frozenset(settings.domain),
        )
        outcome = asyncio.run(job.run_once())
        return {"purged": outcome.purged, "held_back": outcome.held_back}

    @app.task(name=AUDIT_CHECKPOINT, shared=False, acks_late=True)
    def audit_checkpoint() -> int:
        """Sign the audit log's head; return its seq (0: nothing to sign yet)."""
        return asyncio.run(sign_audit_head(settings, paths))

    @app.task(name=BLOCKLIST_REFRESH, shared=False, acks_late=True)
    def blocklist_refresh() -> dict[str, str]:
        """Download the configured block lists; PATH -> what happened."""
        return refresh_blocklists(settings)

    @app.task(name=RETRAIN, shared=False, acks_late=True)
    def retrain_task() -> dict[str, Any]:
        """A scheduled retrain; the new version, whether it was activated, the examples."""
        return scheduled_retrain(settings)
