"""The dashboard's figures: messages, blocked and quarantined per day, top blocked remote
domains and top rules fired, over a window of whole UTC days ending today.

One store call (`ArchiveStore.activity`) does the counting; this module picks the window
from the injected clock and shapes the result for the API and the web UI's charts. Figures
only, no content: reading them is not an audited read of the archive.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from archive_api.store.base import Activity, ArchiveStore
from classifier.clock import Clock
from classifier.verdict import Action

BLOCKED = (Action.REJECT, Action.DROP)


@dataclass(frozen=True, slots=True)
class DayFigures:
    day: date
    messages: int  # every record of the day
    blocked: int  # rejected or dropped
    quarantined: int
    flagged: int

    def to_json(self) -> dict[str, Any]:
        return {
            "day": self.day.isoformat(),
            "messages": self.messages,
            "blocked": self.blocked,
            "quarantined": self.quarantined,
            "flagged": self.flagged,
        }


@dataclass(frozen=True, slots=True)
class Dashboard:
    since: datetime
    until: datetime
    days: tuple[DayFigures, ...]  # every day of the window, oldest first (zeros included)
    top_blocked_domains: tuple[tuple[str, int], ...]
    top_rules: tuple[tuple[str, int], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "days": [d.to_json() for d in self.days],
            "totals": {
                "messages": sum(d.messages for d in self.days),
                "blocked": sum(d.blocked for d in self.days),
                "quarantined": sum(d.quarantined for d in self.days),
                "flagged": sum(d.flagged for d in self.days),
            },
            "top_blocked_domains": [
                {"domain": domain, "count": n} for domain, n in self.top_blocked_domains
            ],
            "top_rules": [{"rule": rule, "count": n} for rule, n in self.top_rules],
        }


def window(now: datetime, days: int) -> tuple[datetime, datetime]:
    """`days` whole UTC days ending with today's (which is still running)."""
    today = now.astimezone(UTC).date()
    until = datetime(today.year, today.month, today.day, tzinfo=UTC) + timedelta(days=1)
    return until - timedelta(days=days), until


def shape(activity: Activity, since: datetime, until: datetime) -> tuple[DayFigures, ...]:
    found = {d.day: dict(d.by_action) for d in activity.days}
    out = []
    day = since.date()
    while day < until.date():
        counts = found.get(day, {})
        out.append(
            DayFigures(
                day,
                sum(counts.values()),
                sum(counts.get(a, 0) for a in BLOCKED),
                counts.get(Action.QUARANTINE, 0),
                counts.get(Action.FLAG, 0),
            )
        )
        day += timedelta(days=1)
    return tuple(out)


async def dashboard(store: ArchiveStore, clock: Clock, *, days: int, top: int = 10) -> Dashboard:
    since, until = window(clock.now(), days)
    activity = await store.activity(since, until, top=top)
    return Dashboard(
        since, until, shape(activity, since, until), activity.blocked_domains, activity.rules
    )
