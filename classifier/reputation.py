"""Per-sender reputation from spam reports, decaying over time.

A XEP-0377 report ("this is spam", sent with a XEP-0191 block) and an officer's "confirmed
spam" are the strongest signals a deployment gets about a sender, and they should count at
once, not only after the next retraining. The edge feeds each one into a `ReputationLedger`
(`note_report`); the `ReputationRule` turns what the ledger knows about a stanza's sender
into a score contribution and, above thresholds, a FLAG or a QUARANTINE.

How reports add up, kept simple but hard to game:

- one reporter counts once per sender: reporting the same sender again refreshes the time of
  that reporter's report (and keeps the larger weight), so one user reporting fifty messages
  is one report, and several users reporting one sender is several;
- a report carries a weight in (0, 1]: the edge lowers it for reporters whom officers have
  often contradicted (`stanzaguard.learning`); a report an officer contradicts can be
  withdrawn;
- reports decay exponentially: a report ``half_life`` old counts half. The half-life is the
  policy's (``[reputation] half_life_hours``), applied when the rule reads the ledger, so a
  policy reload changes it for every report already noted.

The ledger is in memory, thread-safe and bounded (senders and reporters per sender, least
recently reported first out). Nothing here does I/O; the edge replays its durable record of
reports into a fresh ledger at start-up.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from classifier.context import DecisionContext, Direction, StanzaKind
from classifier.errors import RuleError
from classifier.jid import normalise_bare
from classifier.rules import MAX_CONTRIBUTION, RuleResult
from classifier.trust import is_groupchat
from classifier.verdict import Action

JUDGED_KINDS = frozenset(
    {StanzaKind.MESSAGE, StanzaKind.SUBSCRIPTION, StanzaKind.MUC_INVITE, StanzaKind.CALL}
)
# Below this decayed weight a sender is treated as unreported (and may be evicted).
NEGLIGIBLE = 1e-3
DEFAULT_HALF_LIFE = timedelta(hours=72)


@dataclass(frozen=True, slots=True)
class Report:
    """One reporter's (latest) report against one sender."""

    reporter: str
    at: datetime
    weight: float


def _key(jid: str) -> str:
    try:
        return str(normalise_bare(jid))
    except Exception:
        # Hostile or broken input still gets a stable key; it just never matches a real JID.
        return jid.strip().lower()


def decay(age: timedelta, half_life: timedelta) -> float:
    """The factor a report of this age counts with: 1 when new (or from the future)."""
    if age <= timedelta(0):
        return 1.0
    return math.pow(0.5, age / half_life)


class ReputationLedger:
    """Reports per sender: who reported them, when, with what weight."""

    def __init__(self, *, max_senders: int = 100_000, max_reporters: int = 1_000) -> None:
        """Create an empty ledger.

        Args:
            max_senders: Senders remembered; the one reported least recently goes first.
            max_reporters: Reporters remembered per sender; the oldest report goes first.
        """
        if max_senders < 1 or max_reporters < 1:
            raise RuleError("ReputationLedger limits must be at least 1")
        self._max_senders = max_senders
        self._max_reporters = max_reporters
        self._lock = threading.Lock()
        self._senders: OrderedDict[str, OrderedDict[str, Report]] = OrderedDict()
        self._anonymous = itertools.count(1)

    def __len__(self) -> int:
        """How many senders have at least one report."""
        return len(self._senders)

    def note_report(
        self, sender: str, at: datetime, *, reporter: str | None = None, weight: float = 1.0
    ) -> None:
        """Record that ``reporter`` reported ``sender`` as a spammer at ``at``.

        Args:
            sender: The reported JID (any form; its bare JID is the key).
            at: When the report was made (timezone-aware).
            reporter: Who reported (a bare JID, or ``officer:NAME``); without one, every
                call is a report of its own.
            weight: How much the report counts, in (0, 1]; 0 or less records nothing.
        """
        if at.tzinfo is None:
            raise RuleError("report times must be timezone-aware")
        if not math.isfinite(weight) or weight <= 0.0:
            return
        weight = min(weight, 1.0)
        who = _key(reporter) if reporter else f"#anonymous-{next(self._anonymous)}"
        key = _key(sender)
        with self._lock:
            reports = self._senders.get(key)
            if reports is None:
                reports = self._senders[key] = OrderedDict()
            self._senders.move_to_end(key)
            previous = reports.get(who)
            if previous is not None:
                at = max(at, previous.at)
                weight = max(weight, previous.weight)
            reports[who] = Report(who, at, weight)
            reports.move_to_end(who)
            while len(reports) > self._max_reporters:
                reports.popitem(last=False)
            while len(self._senders) > self._max_senders:
                self._senders.popitem(last=False)

    def withdraw(self, sender: str, reporter: str) -> bool:
        """Remove ``reporter``'s report against ``sender`` (an officer contradicted it).

        Returns:
            Whether there was such a report.
        """
        key = _key(sender)
        with self._lock:
            reports = self._senders.get(key)
            if reports is None or reports.pop(_key(reporter), None) is None:
                return False
            if not reports:
                del self._senders[key]
            return True

    def reports(self, sender: str) -> tuple[Report, ...]:
        """The reports against ``sender``, oldest first."""
        with self._lock:
            reports = self._senders.get(_key(sender))
            return tuple(reports.values()) if reports else ()

    def weight(
        self, sender: str, at: datetime, half_life: timedelta = DEFAULT_HALF_LIFE
    ) -> tuple[float, int]:
        """The decayed, weighted number of reports against ``sender`` at time ``at``.

        Returns:
            ``(weight, reporters)``: the sum of each report's weight times its decay, and how
            many reporters that sum covers.
        """
        with self._lock:
            reports = self._senders.get(_key(sender))
            if not reports:
                return 0.0, 0
            snapshot = tuple(reports.values())
        total = sum(r.weight * decay(at - r.at, half_life) for r in snapshot)
        return total, len(snapshot)

    def forget(self, sender: str) -> None:
        """Drop every report against ``sender``."""
        with self._lock:
            self._senders.pop(_key(sender), None)

    def load(self, reports: Iterable[tuple[str, Report]]) -> None:
        """Note many ``(sender, report)`` pairs, e.g. replayed from a durable log."""
        for sender, report in reports:
            self.note_report(sender, report.at, reporter=report.reporter, weight=report.weight)


class ReputationRule:
    """Scores a stanza by the reports against its sender.

    The contribution is ``points`` times the decayed weighted report count; reaching
    ``flag_at`` flags the stanza, reaching ``quarantine_at`` holds it (both in weighted
    reports, compared at two decimals; ``None`` switches one off). Rooms speaking in a
    groupchat are not judged: their sender is the room.
    """

    def __init__(
        self,
        ledger: ReputationLedger,
        *,
        points: float = 1.0,
        half_life: timedelta = DEFAULT_HALF_LIFE,
        flag_at: float | None = 1.0,
        quarantine_at: float | None = 3.0,
        directions: Iterable[Direction] = (Direction.INBOUND, Direction.OUTBOUND),
        rule_id: str = "reputation",
    ) -> None:
        if not math.isfinite(points) or abs(points) > MAX_CONTRIBUTION:
            raise RuleError(f"points must be finite and within ±{MAX_CONTRIBUTION:g}")
        if half_life <= timedelta(0):
            raise RuleError("half_life must be positive")
        for name, value in (("flag_at", flag_at), ("quarantine_at", quarantine_at)):
            if value is not None and (not math.isfinite(value) or value <= 0.0):
                raise RuleError(f"{name} must be a positive number, got {value!r}")
        if flag_at is not None and quarantine_at is not None and flag_at > quarantine_at:
            raise RuleError("flag_at must not exceed quarantine_at")
        self._ledger = ledger
        self._points = points
        self._half_life = half_life
        self._flag_at = flag_at
        self._quarantine_at = quarantine_at
        self._directions = frozenset(directions)
        self._rule_id = rule_id

    @property
    def rule_id(self) -> str:
        return self._rule_id

    @property
    def description(self) -> str:
        return "the sender was reported as a spammer (XEP-0377 reports, officers' verdicts)"

    @property
    def ledger(self) -> ReputationLedger:
        return self._ledger

    def evaluate(self, ctx: DecisionContext) -> RuleResult | None:
        if ctx.kind not in JUDGED_KINDS or ctx.direction not in self._directions:
            return None
        if is_groupchat(ctx):
            return None
        weight, reporters = self._ledger.weight(ctx.sender, ctx.timestamp, self._half_life)
        if weight < NEGLIGIBLE:
            return None
        # Thresholds compare the weight as the reason shows it (two decimals): a report made
        # a moment ago counts as one report, not as 0.99999.
        shown = round(weight, 2)
        action = Action.ALLOW
        if self._quarantine_at is not None and shown >= self._quarantine_at:
            action = Action.QUARANTINE
        elif self._flag_at is not None and shown >= self._flag_at:
            action = Action.FLAG
        score = max(-MAX_CONTRIBUTION, min(MAX_CONTRIBUTION, self._points * weight))
        who = "reporter" if reporters == 1 else "reporters"
        return RuleResult(
            action,
            score,
            f"reported as spam by {reporters} {who} (weighted, decayed: {weight:.2f})",
        )
