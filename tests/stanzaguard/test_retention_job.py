"""The service's retention job: the same purge as the command, on a timer, as the system."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from archive_api.audit import AuditAction
from classifier.clock import ManualClock
from stanzaguard.errors import StanzaGuardError
from stanzaguard.operations import Paths
from stanzaguard.retention_job import RetentionJob
from tests.stanzaguard.test_purge_cli import audit_events, cli, data_dir, remaining

__all__ = ["data_dir"]  # the fixture, shared with the command's tests


def job(data_dir: Path, *, purge_due: bool = True, interval: float = 3600.0) -> RetentionJob:
    return RetentionJob(
        Paths(data_dir),
        data_dir.parent / "retention.toml",
        policy_file=None,
        clock=ManualClock(datetime(2026, 1, 1, tzinfo=UTC)),
        interval=interval,
        purge_due=purge_due,
    )


def test_a_round_classifies_purges_and_audits_as_the_system(data_dir: Path) -> None:
    outcome = asyncio.run(job(data_dir).run_once())
    assert outcome.purged == 3 and outcome.held_back == 1
    assert remaining(data_dir) == {"m1", "d1"}
    batch = audit_events(data_dir, AuditAction.PURGE)[-1]
    assert batch.actor == "system:retention"
    assert sorted(batch.params["record_ids"]) == ["a1", "a2", "a3"]
    verified = cli("verify", "--data-dir", str(data_dir))
    assert verified.exit_code == 0, verified.output


def test_dry_run_rounds_purge_nothing(data_dir: Path) -> None:
    outcome = asyncio.run(job(data_dir, purge_due=False).run_once())
    assert outcome.dry_run and outcome.purged == 3
    assert remaining(data_dir) == {"a1", "a2", "a3", "m1", "d1"}


def test_the_timer_runs_rounds_until_stopped(data_dir: Path) -> None:
    async def run() -> RetentionJob:
        retention = job(data_dir, interval=0.05)
        retention.start()
        for _ in range(200):
            if retention.rounds >= 2:
                break
            await asyncio.sleep(0.02)
        await retention.stop()
        return retention

    retention = asyncio.run(run())
    assert retention.rounds >= 2 and retention.failures == 0
    assert remaining(data_dir) == {"m1", "d1"}


def test_a_broken_retention_file_is_refused_up_front(data_dir: Path) -> None:
    (data_dir.parent / "retention.toml").write_text("[retention]\ndefault = 'nope'\n[[x")
    with pytest.raises(StanzaGuardError):
        job(data_dir).check()


def test_a_policy_without_local_domains_takes_the_served_domains(data_dir: Path) -> None:
    # The proxy reads a policy that leaves out `local_domains` with the served domains as
    # local; the retention job must read the same file the same way, groups included.
    policy = data_dir.parent / "policy.toml"
    policy.write_text('version = 1\n\n[groups.traders]\nmembers = ["alice@corp.example"]\n')
    (data_dir.parent / "retention.toml").write_text(
        '[retention]\ndefault = "standard"\n[retention.classes]\nstandard = "3y"\n'
        'desk = "6y"\n[[retention.rules]]\nclass = "desk"\ngroups = ["traders"]\n'
    )

    def with_domains(domains: frozenset[str]) -> RetentionJob:
        return RetentionJob(
            Paths(data_dir),
            data_dir.parent / "retention.toml",
            policy_file=policy,
            clock=ManualClock(datetime(2026, 1, 1, tzinfo=UTC)),
            interval=3600.0,
            local_domains=domains,
        )

    with_domains(frozenset({"corp.example"})).check()
    with pytest.raises(StanzaGuardError, match="local_domains"):
        with_domains(frozenset()).check()
