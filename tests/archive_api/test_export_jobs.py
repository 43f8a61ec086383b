"""Export jobs: background runs, failures recorded, state across a restart, safe file look-up."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from archive_api.errors import ExportError
from archive_api.export_jobs import ExportJobs, ExportNotReady, JobState, UnknownExport
from archive_api.exports import ExportFormat, ExportSource, PdfFonts
from archive_api.store.sqlite import SqliteStore
from classifier.clock import ManualClock
from tests.archive_api.store.conformance import ChainWriter, record


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "archive.sqlite3")
    await opened.apply(ChainWriter().records(record("a"), record("b")))
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 2, 1, tzinfo=UTC))


async def test_a_job_runs_and_its_files_are_found_by_name_only(
    store: SqliteStore, clock: ManualClock, tmp_path: Path
) -> None:
    jobs = ExportJobs(store, clock, tmp_path / "exports")
    job = await jobs.start(ExportSource.of_query(""), ExportFormat.CSV, "token:o")
    assert job.state is JobState.QUEUED
    done = await jobs.wait(job.job_id)
    assert (done.state, done.written, done.total) == (JobState.DONE, 2, 2)
    path, exported = await jobs.file(job.job_id, "records.csv")
    assert exported is not None and exported.records == 2 and path.is_file()
    manifest, none = await jobs.file(job.job_id, "manifest.json")
    assert none is None and json.loads(manifest.read_bytes())["record_count"] == 2
    for name in ("../job.json", "job.json", "files/records.csv", "", "records.csv/"):
        with pytest.raises(UnknownExport):
            await jobs.file(job.job_id, name)
    for job_id in ("exp-zz", "../../x", "exp-" + "0" * 16):
        with pytest.raises(UnknownExport):
            await jobs.get(job_id)


async def test_a_failed_job_says_why_and_has_no_files(
    store: SqliteStore, clock: ManualClock, tmp_path: Path
) -> None:
    fonts = PdfFonts(tmp_path / "missing.ttf", tmp_path / "missing-bold.ttf")
    jobs = ExportJobs(store, clock, tmp_path / "exports", pdf_fonts=fonts)
    job = await jobs.start(ExportSource.of_query(""), ExportFormat.PDF, "token:o")
    failed = await jobs.wait(job.job_id)
    assert failed.state is JobState.FAILED and "font" in (failed.error or "")
    with pytest.raises(ExportNotReady):
        await jobs.file(job.job_id, "manifest.json")


async def test_jobs_survive_a_restart_and_unfinished_ones_are_marked(
    store: SqliteStore, clock: ManualClock, tmp_path: Path
) -> None:
    root = tmp_path / "exports"
    first = ExportJobs(store, clock, root)
    started = await first.start(ExportSource.of_query(""), ExportFormat.JSONL, "t:o")
    done = await first.wait(started.job_id)
    # A job the previous process left running (its state file says so).
    stale = root / "exp-00000000000000aa"
    stale.mkdir()
    record_of_stale = dict(done.to_json(), job_id=stale.name, state="running", files=[])
    (stale / "job.json").write_text(json.dumps(record_of_stale))
    (root / "not-a-job").mkdir()
    (root / "exp-00000000000000bb").mkdir()  # no state file: ignored
    again = ExportJobs(store, clock, root)
    listed = {job.job_id: job for job in await again.list()}
    assert set(listed) == {done.job_id, stale.name}
    assert listed[done.job_id].state is JobState.DONE
    assert listed[stale.name].state is JobState.FAILED
    assert "interrupted" in (listed[stale.name].error or "")
    path, _ = await again.file(done.job_id, "records.jsonl")
    assert path.read_bytes().count(b"\n") == 2


async def test_a_deleted_file_is_not_served(
    store: SqliteStore, clock: ManualClock, tmp_path: Path
) -> None:
    jobs = ExportJobs(store, clock, tmp_path / "exports")
    started = await jobs.start(ExportSource.of_query(""), ExportFormat.JSONL, "t:o")
    job = await jobs.wait(started.job_id)
    path, _ = await jobs.file(job.job_id, "records.jsonl")
    path.unlink()
    with pytest.raises(UnknownExport):
        await jobs.file(job.job_id, "records.jsonl")


async def test_bad_arguments(store: SqliteStore, clock: ManualClock, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_running"):
        ExportJobs(store, clock, tmp_path, max_running=0)
    blocked = tmp_path / "file"
    blocked.write_text("x")
    jobs = ExportJobs(store, clock, blocked / "exports")
    with pytest.raises(ExportError):
        await jobs.start(ExportSource.of_query(""), ExportFormat.JSONL, "t:o")
