"""Exports the API starts: background jobs with progress, listed and downloadable afterwards.

`archive_api.exports.export_records` does the writing; this module runs it as an asyncio
task per job (at most `max_running` at once, the others wait their turn), keeps each job's
state and progress, and serves its files. Every job has its own directory under `root`:

    ROOT/JOB_ID/job.json     the job's state (written atomically at every transition)
    ROOT/JOB_ID/files/       the export itself: its files and, last, manifest.json

Jobs survive a restart of the service: finished ones are read back from `job.json`; one
that was queued or running when the process stopped is marked failed ("interrupted"),
since `export_records` removes a partial export only in the process that wrote it.

One process serves the exports of a data directory: a second API process on the same
directory would read the first one's running jobs as interrupted when it starts.

A file is served only when the job finished and the file is `manifest.json` or listed in
it; the name is matched against that list, never joined to a path as given, so no request
can reach outside the job's directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from archive_api.errors import ArchiveApiError, ExportError
from archive_api.exports import (
    MANIFEST_NAME,
    ExportedFile,
    ExportFormat,
    ExportSource,
    PdfFonts,
    export_records,
)
from archive_api.store.base import ArchiveStore
from archive_api.store.errors import StoreError
from classifier.clock import Clock

log = logging.getLogger(__name__)

JOB_ID_PATTERN: Final = re.compile(r"exp-[0-9a-f]{16}")
_JOB_FILE: Final = "job.json"
_FILES_DIR: Final = "files"
MAX_KEPT_JOBS: Final = 10_000


class UnknownExport(ArchiveApiError, LookupError):
    """No export job with that id, or no such file in it (HTTP 404)."""


class ExportNotReady(ArchiveApiError):
    """The export has not finished (or failed), so it has no files to download (HTTP 409)."""


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ExportJob:
    job_id: str
    actor: str
    format: ExportFormat
    source: dict[str, Any]  # ExportSource.to_json()
    created_at: datetime
    state: JobState = JobState.QUEUED
    written: int = 0  # records written so far
    total: int | None = None  # records expected (known once the job starts)
    error: str | None = None
    finished_at: datetime | None = None
    files: tuple[ExportedFile, ...] = ()
    manifest_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "actor": self.actor,
            "format": self.format.value,
            "source": self.source,
            "created_at": self.created_at.isoformat(),
            "state": self.state.value,
            "written": self.written,
            "total": self.total,
            "error": self.error,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "files": [f.to_json() for f in self.files],
            "manifest_sha256": self.manifest_sha256,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportJob:
        finished = data.get("finished_at")
        return cls(
            job_id=str(data["job_id"]),
            actor=str(data["actor"]),
            format=ExportFormat(data["format"]),
            source=dict(data["source"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            state=JobState(data["state"]),
            written=int(data.get("written", 0)),
            total=None if data.get("total") is None else int(data["total"]),
            error=data.get("error"),
            finished_at=datetime.fromisoformat(finished) if finished else None,
            files=tuple(
                ExportedFile(str(f["name"]), str(f["sha256"]), int(f["size"]), int(f["records"]))
                for f in data.get("files", [])
            ),
            manifest_sha256=data.get("manifest_sha256"),
        )


def new_job_id() -> str:
    return "exp-" + secrets.token_hex(8)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with tmp.open("xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ExportJobs:
    """Starts, tracks and serves export jobs under `root`."""

    def __init__(
        self,
        store: ArchiveStore,
        clock: Clock,
        root: Path,
        *,
        max_running: int = 2,
        pdf_fonts: PdfFonts | None = None,
        new_id: Callable[[], str] = new_job_id,
        on_finished: Callable[[ExportJob], None] | None = None,
    ) -> None:
        if max_running < 1:
            raise ValueError("max_running must be at least 1")
        self._store = store
        self._clock = clock
        self.root = root
        self._slots = asyncio.Semaphore(max_running)
        self._pdf_fonts = pdf_fonts
        self._new_id = new_id
        self._on_finished = on_finished
        self._jobs: dict[str, ExportJob] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loaded = False

    # -- state on disk --

    def _load(self) -> None:
        """Read the jobs of earlier runs once; mark the ones they left unfinished as failed."""
        if self._loaded:
            return
        self._loaded = True
        if not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir()):
            if not JOB_ID_PATTERN.fullmatch(entry.name) or entry.name in self._jobs:
                continue
            try:
                job = ExportJob.from_json(json.loads((entry / _JOB_FILE).read_bytes()))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("export job %s: unreadable %s; skipped", entry.name, _JOB_FILE)
                continue
            if job.job_id != entry.name:
                continue
            if job.state in (JobState.QUEUED, JobState.RUNNING):
                job = replace(
                    job,
                    state=JobState.FAILED,
                    error="interrupted: the service stopped before the export finished",
                )
                self._save(job)
            self._jobs[job.job_id] = job

    def _save(self, job: ExportJob) -> None:
        directory = self.root / job.job_id
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(directory / _JOB_FILE, (json.dumps(job.to_json(), indent=1) + "\n").encode())

    # -- jobs --

    async def start(
        self, source: ExportSource, export_format: ExportFormat, actor: str
    ) -> ExportJob:
        """Queue an export of `source`; it runs in the background. Returns the queued job."""
        await asyncio.to_thread(self._load)
        if len(self._jobs) >= MAX_KEPT_JOBS:
            raise ExportError(
                f"{MAX_KEPT_JOBS} export jobs are kept already; remove old ones from {self.root}"
            )
        job = ExportJob(
            job_id=self._new_id(),
            actor=actor,
            format=ExportFormat(export_format),
            source=source.to_json(),
            created_at=self._clock.now(),
        )
        try:
            await asyncio.to_thread(self._save, job)
        except OSError as exc:
            raise ExportError(f"cannot create the export job: {exc.strerror or exc}") from None
        self._jobs[job.job_id] = job
        task = asyncio.create_task(self._run(job.job_id, source), name=f"export-{job.job_id}")
        self._tasks[job.job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.job_id, None))
        return job

    async def _run(self, job_id: str, source: ExportSource) -> None:
        async with self._slots:
            job = replace(self._jobs[job_id], state=JobState.RUNNING)
            self._jobs[job_id] = job
            await asyncio.to_thread(self._save, job)

            def progress(written: int, total: int | None) -> None:
                self._jobs[job_id] = replace(self._jobs[job_id], written=written, total=total)

            try:
                result = await export_records(
                    self._store,
                    source,
                    job.format,
                    self.root / job_id / _FILES_DIR,
                    actor=job.actor,
                    clock=self._clock,
                    progress=progress,
                    pdf_fonts=self._pdf_fonts,
                )
            except asyncio.CancelledError:
                self._finish(job_id, error="cancelled: the service stopped")
                raise
            except (ExportError, StoreError) as exc:
                self._finish(job_id, error=str(exc))
            except Exception as exc:  # a bug must not leave the job "running" forever
                log.exception("export job %s failed", job_id)
                self._finish(job_id, error=f"internal error ({type(exc).__name__})")
            else:
                self._finish(
                    job_id,
                    written=result.record_count,
                    files=result.files,
                    manifest_sha256=result.manifest_sha256,
                )

    def _finish(
        self,
        job_id: str,
        *,
        error: str | None = None,
        written: int | None = None,
        files: tuple[ExportedFile, ...] = (),
        manifest_sha256: str | None = None,
    ) -> None:
        job = self._jobs[job_id]
        job = replace(
            job,
            state=JobState.FAILED if error is not None else JobState.DONE,
            error=error,
            written=job.written if written is None else written,
            total=job.total if written is None else written,
            files=files,
            manifest_sha256=manifest_sha256,
            finished_at=self._clock.now(),
        )
        self._jobs[job_id] = job
        try:
            self._save(job)
        except OSError as exc:
            log.error("export job %s: cannot record its state: %s", job_id, exc)
        if self._on_finished is not None:
            self._on_finished(job)

    async def get(self, job_id: str) -> ExportJob:
        if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
            raise UnknownExport(f"no export job {str(job_id)[:40]!r}")
        await asyncio.to_thread(self._load)
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownExport(f"no export job {job_id!r}")
        return job

    async def list(self) -> tuple[ExportJob, ...]:
        """Every job, newest first."""
        await asyncio.to_thread(self._load)
        return tuple(sorted(self._jobs.values(), key=lambda j: (j.created_at, j.job_id))[::-1])

    async def file(self, job_id: str, name: str) -> tuple[Path, ExportedFile | None]:
        """The path of one file of a finished job: `manifest.json` (second item None) or a
        file the manifest lists. UnknownExport for any other name, ExportNotReady when the
        job has not finished."""
        job = await self.get(job_id)
        if job.state is not JobState.DONE:
            raise ExportNotReady(f"export {job_id} is {job.state.value}; it has no files yet")
        files_dir = self.root / job_id / _FILES_DIR
        found: tuple[Path, ExportedFile | None] | None = None
        if name == MANIFEST_NAME:
            found = (files_dir / MANIFEST_NAME, None)
        for exported in job.files:
            if exported.name == name:
                found = (files_dir.joinpath(*exported.name.split("/")), exported)
        if found is None:
            raise UnknownExport(f"export {job_id} has no file {name[:200]!r}")
        if not await asyncio.to_thread(found[0].is_file):
            raise UnknownExport(f"export {job_id}: {name[:200]!r} is no longer on disk")
        return found

    async def wait(self, job_id: str) -> ExportJob:
        """Wait for a job to finish (tests, the CLI); returns its final state."""
        task = self._tasks.get(job_id)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
        return await self.get(job_id)

    async def close(self) -> None:
        """Cancel running jobs (they are recorded as failed, their partial files removed)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
