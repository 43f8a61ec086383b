"""Labelled examples from spam reports and officers' verdicts, and the reputation they feed.

Two kinds of label reach the service:
- XEP-0377 reports: a user blocked someone and said "spam" (or "abuse"). The pipeline hands
  each durable report over (`ReportObserver`) with the archived messages it is about;
- officers: releasing a held message says "ham", confirming it as spam says "spam", and an
  officer may label any archived message (`stanzaguard label`).

Each becomes a `LabelledExample` (text, label, source, who, weight, the archived record it
is about) in ``DATA/learning/examples.jsonl``, and every spam label counts against the
sender's reputation at once (`classifier.reputation.ReputationLedger`).

Why a JSON Lines file in the data directory rather than a table in the archive database:
the archive database is an index *projected from* the hash-chained spool (`stanzaguard
reindex --replace` rebuilds it from evidence, and only `archive_api.store.sqlite` speaks
SQL); examples are derived learning data, not evidence, and must survive a rebuild. The file
is append-only (each line one event, never rewritten), readable by any training script, and
small (reports and officer labels are rare next to messages). The *effective* examples are
computed when read:
- one reporter reporting one message several times counts once;
- an officer's label of a message wins over users' reports of it (the newest officer label
  per message wins);
- a reporter's weight is ``(1 + upheld) / (1 + upheld + contradicted)`` (at least 0.05), where
  upheld/contradicted count the messages they reported that officers labelled spam/ham: a
  reporter whose reports officers keep contradicting counts less, in training and in
  reputation.

Reputation itself is in memory; at start-up it is rebuilt by replaying the file (old reports
have decayed by then anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from archive_api.store.base import ArchiveStore
from archive_api.store.records import ArchiveRecord
from classifier.clock import Clock
from classifier.reputation import ReputationLedger
from proxy.indexer import IndexControl
from proxy.pipeline import ReportNotice

log = logging.getLogger(__name__)

MIN_REPORTER_WEIGHT = 0.05
MAX_TEXT_CHARS = 20_000
OFFICER_PREFIX = "officer:"


class Label(StrEnum):
    SPAM = "spam"
    HAM = "ham"


class Source(StrEnum):
    REPORT = "report"  # a user's XEP-0377 report
    OFFICER = "officer"  # an officer's release, confirmation or label


@dataclass(frozen=True, slots=True)
class LabelledExample:
    """One labelled example, as written (``weight``) or as effective (`effective_examples`).

    Attributes:
        example_id: Unique id of this line.
        at: When the label was given.
        label: spam or ham.
        source: report or officer.
        actor: The reporter's bare JID, or the officer's name.
        sender: Bare JID of whoever sent the labelled message (the reported JID).
        record_id: The archived message (None if a report named nothing the proxy saw).
        text: The message body (None when unknown).
        weight: How much the example counts for training.
        report_record_id: The REPORT record, for report examples.
    """

    example_id: str
    at: datetime
    label: Label
    source: Source
    actor: str
    sender: str
    record_id: str | None
    text: str | None
    weight: float = 1.0
    report_record_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "example_id": self.example_id,
            "at": self.at.isoformat(),
            "label": self.label.value,
            "source": self.source.value,
            "actor": self.actor,
            "sender": self.sender,
            "record_id": self.record_id,
            "text": self.text,
            "weight": self.weight,
            "report_record_id": self.report_record_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabelledExample:
        return cls(
            example_id=str(data["example_id"]),
            at=datetime.fromisoformat(data["at"]),
            label=Label(data["label"]),
            source=Source(data["source"]),
            actor=str(data["actor"]),
            sender=str(data.get("sender") or ""),
            record_id=data.get("record_id"),
            text=data.get("text"),
            weight=float(data.get("weight", 1.0)),
            report_record_id=data.get("report_record_id"),
        )


def _new_id() -> str:
    return secrets.token_hex(12)


class LabelledExamples:
    """The append-only examples file and the indexes the weights need (kept in memory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lines: list[LabelledExample] = []
        self._reported: dict[str, set[str]] = {}  # reporter -> record ids they reported
        self._reporters_of: dict[str, set[str]] = {}  # record id -> reporters
        self._officer: dict[str, LabelledExample] = {}  # record id -> newest officer label

    @classmethod
    def load(cls, path: Path) -> LabelledExamples:
        examples = cls(path)
        for example in read_examples(path):
            examples._index(example)
        return examples

    def __len__(self) -> int:
        return len(self._lines)

    @property
    def lines(self) -> tuple[LabelledExample, ...]:
        """Every example as written, oldest first."""
        return tuple(self._lines)

    def _index(self, example: LabelledExample) -> None:
        self._lines.append(example)
        rid = example.record_id
        if rid is None:
            return
        if example.source is Source.REPORT:
            self._reported.setdefault(example.actor, set()).add(rid)
            self._reporters_of.setdefault(rid, set()).add(example.actor)
        else:
            current = self._officer.get(rid)
            if current is None or current.at <= example.at:
                self._officer[rid] = example

    def already_reported(self, reporter: str, record_id: str) -> bool:
        return record_id in self._reported.get(reporter, ())

    def reporters_of(self, record_id: str) -> frozenset[str]:
        return frozenset(self._reporters_of.get(record_id, ()))

    def officer_label(self, record_id: str) -> Label | None:
        example = self._officer.get(record_id)
        return example.label if example is not None else None

    def reporter_stats(self, reporter: str) -> tuple[int, int]:
        """``(upheld, contradicted)``: reported messages officers labelled spam / ham."""
        upheld = contradicted = 0
        for rid in self._reported.get(reporter, ()):
            label = self.officer_label(rid)
            if label is Label.SPAM:
                upheld += 1
            elif label is Label.HAM:
                contradicted += 1
        return upheld, contradicted

    def reporter_weight(self, reporter: str) -> float:
        upheld, contradicted = self.reporter_stats(reporter)
        weight = (1 + upheld) / (1 + upheld + contradicted)
        return max(MIN_REPORTER_WEIGHT, weight)

    def append(self, example: LabelledExample) -> None:
        """Write one line (flushed and fsync'd) and index it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(example.to_json(), ensure_ascii=False, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._index(example)

    def effective(self) -> list[LabelledExample]:
        """The examples to train on, with their current weights (see the module docstring)."""
        out: list[LabelledExample] = []
        seen_reports: set[tuple[str, str]] = set()
        for example in self._lines:
            rid = example.record_id
            if example.source is Source.OFFICER:
                if rid is not None and self._officer.get(rid) is not example:
                    continue  # a newer officer label of the same message wins
                out.append(example)
                continue
            if rid is not None and rid in self._officer:
                continue  # an officer has labelled this message
            key = (example.actor, rid or f"text:{example.sender}:{example.text}")
            if key in seen_reports:
                continue  # the same reporter, the same message: counted once
            seen_reports.add(key)
            weight = self.reporter_weight(example.actor)
            out.append(
                LabelledExample(
                    example.example_id,
                    example.at,
                    example.label,
                    example.source,
                    example.actor,
                    example.sender,
                    rid,
                    example.text,
                    weight,
                    example.report_record_id,
                )
            )
        return out


def read_examples(path: Path) -> Iterator[LabelledExample]:
    """The file's examples in order; a torn or bad line (a crash mid-append) is skipped."""
    try:
        handle = path.open(encoding="utf-8")
    except FileNotFoundError:
        return
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield LabelledExample.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError):
                log.warning("examples file: line %d unreadable; skipped", number)


def _is_spam_report(reason: str | None) -> bool:
    # XEP-0377 reasons are spam and abuse; both say "unwanted". A report without a reason
    # (a client that only blocks) is a report too.
    return reason in (None, "spam", "abuse")


class Learning:
    """Turns reports and officers' verdicts into examples and reputation.

    It is the pipeline's `ReportObserver`: `reports_seen` only updates reputation (at once,
    so the reported sender's next stanza already scores higher) and queues the examples;
    a background task fetches the reported messages' text from the store and appends them.
    """

    def __init__(
        self,
        path: Path,
        *,
        reputation: ReputationLedger,
        store: ArchiveStore,
        indexer: IndexControl | None,
        clock: Clock,
    ) -> None:
        self.examples = LabelledExamples.load(path)
        self.reputation = reputation
        self.store = store
        self.indexer = indexer
        self.clock = clock
        self._queue: asyncio.Queue[ReportNotice] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._replay()

    # -- lifecycle --

    def _replay(self) -> None:
        """Rebuild reputation from the examples file, oldest first."""
        for example in self.examples.lines:
            if example.label is Label.SPAM:
                reporter = example.actor
                if example.source is Source.OFFICER:
                    reporter = OFFICER_PREFIX + example.actor
                    weight = 1.0
                else:
                    weight = self.examples.reporter_weight(example.actor)
                self.reputation.note_report(
                    example.sender, example.at, reporter=reporter, weight=weight
                )
            elif example.record_id is not None:
                for reporter in self.examples.reporters_of(example.record_id):
                    self.reputation.withdraw(example.sender, reporter)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Write what is queued, then stop."""
        if self._task is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._queue.join(), 10.0)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        while True:
            notice = await self._queue.get()
            try:
                await self._write_report(notice)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not record a report as a labelled example")
            finally:
                self._queue.task_done()

    # -- reports (ReportObserver) --

    def reports_seen(self, notices: Sequence[ReportNotice]) -> None:
        for notice in notices:
            if not _is_spam_report(notice.reason) or not notice.reported:
                continue
            if notice.reported == notice.reporter:
                continue
            weight = self.examples.reporter_weight(notice.reporter)
            self.reputation.note_report(
                notice.reported, notice.at, reporter=notice.reporter, weight=weight
            )
            self._queue.put_nowait(notice)

    async def _write_report(self, notice: ReportNotice) -> None:
        weight = self.examples.reporter_weight(notice.reporter)
        targets: list[str | None] = list(notice.record_ids) or [None]
        for record_id in targets:
            if record_id is not None and self.examples.already_reported(notice.reporter, record_id):
                continue  # the same reporter reporting the same message again
            text = notice.text if record_id is None else None
            if record_id is not None:
                record = await self.record(record_id)
                text = _text_of(record) if record is not None else None
            await asyncio.to_thread(
                self.examples.append,
                LabelledExample(
                    example_id=_new_id(),
                    at=notice.at,
                    label=Label.SPAM,
                    source=Source.REPORT,
                    actor=notice.reporter,
                    sender=notice.reported,
                    record_id=record_id,
                    text=text,
                    weight=weight,
                    report_record_id=notice.report_record_id,
                ),
            )

    async def record(self, record_id: str) -> ArchiveRecord | None:
        """An archived record, indexing what is spooled first if it is not in the store yet."""
        record = await self.store.get(record_id)
        if record is None and self.indexer is not None:
            await self.indexer.drain()
            record = await self.store.get(record_id)
        return record

    async def flush(self) -> None:
        """Wait until every queued report is written (for tests and shutdown)."""
        await self._queue.join()

    # -- officers --

    async def officer_label(self, record: ArchiveRecord, label: Label, actor: str) -> None:
        """An officer says ``record`` is spam or ham: an example, reputation, reporter weights."""
        now = self.clock.now()
        sender = record.sender
        await asyncio.to_thread(
            self.examples.append,
            LabelledExample(
                example_id=_new_id(),
                at=now,
                label=label,
                source=Source.OFFICER,
                actor=actor,
                sender=sender,
                record_id=record.record_id,
                text=_text_of(record),
                weight=1.0,
            ),
        )
        if label is Label.SPAM:
            self.reputation.note_report(sender, now, reporter=OFFICER_PREFIX + actor)
        else:
            # The reports of this message were wrong: they no longer count against the
            # sender, and their reporters' weights have dropped (reporter_weight).
            for reporter in self.examples.reporters_of(record.record_id):
                self.reputation.withdraw(sender, reporter)
            self.reputation.withdraw(sender, OFFICER_PREFIX + actor)


def _text_of(record: ArchiveRecord) -> str | None:
    text = record.body
    if text is None:
        return None
    return text[:MAX_TEXT_CHARS]
