"""Units of quarantine review and learning: the released stanza, the mailbox, the examples."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from archive_api.store.records import Direction
from classifier.reputation import ReputationLedger
from stanzaguard.errors import StanzaGuardError
from stanzaguard.learning import Label, LabelledExample, LabelledExamples, Source, read_examples
from stanzaguard.quarantine import (
    Outcome,
    PendingDeliveries,
    RequestKind,
    RequestQueue,
    ReviewPaths,
    delay_stamp,
    released_stanza,
)

AT = datetime(2026, 3, 4, 5, 6, 7, 891_234, tzinfo=UTC)
RAW = (
    b"<message from='eve@remote.example/x' to='bob@corp.example' type='chat' id='m1'>"
    b"<body>Win at http://prize.example</body>"
    b"<stanza-id xmlns='urn:xmpp:sid:0' by='bob@corp.example' id='s1'/></message>"
)


class TestReleasedStanza:
    def test_readdressed_and_delayed_everything_else_kept(self) -> None:
        out = released_stanza(RAW, to="bob@corp.example/desk", domain="corp.example", stamp=AT)
        element = ET.fromstring(out)
        assert element.get("to") == "bob@corp.example/desk"
        assert (element.get("from"), element.get("id")) == ("eve@remote.example/x", "m1")
        delay = element.find("{urn:xmpp:delay}delay")
        assert delay is not None
        assert (delay.get("from"), delay.get("stamp")) == (
            "corp.example",
            "2026-03-04T05:06:07.891Z",
        )
        # The original bytes survive untouched apart from the two changes.
        assert b"<body>Win at http://prize.example</body>" in out
        assert out.startswith(b"<message from='eve@remote.example/x' to=")

    def test_no_to_attribute_gets_one_and_outgoing_keeps_its_to(self) -> None:
        raw = b"<message type='chat'><body>x</body></message>"
        out = released_stanza(raw, to="bob@corp.example/a", domain="corp.example", stamp=AT)
        assert ET.fromstring(out).get("to") == "bob@corp.example/a"
        kept = released_stanza(RAW, to=None, domain="corp.example", stamp=AT)
        assert ET.fromstring(kept).get("to") == "bob@corp.example"

    def test_quotes_in_attributes_do_not_confuse_the_start_tag(self) -> None:
        raw = b"""<message id='a>b' to="x@y.example"><body>1 > 0</body></message>"""
        out = released_stanza(raw, to="o'neil@corp.example/r", domain="corp.example", stamp=AT)
        element = ET.fromstring(out)
        assert (element.get("id"), element.get("to")) == ("a>b", "o'neil@corp.example/r")

    @pytest.mark.parametrize(
        "raw", [b"", b"<presence/>", b"<message/>", b"<iq><message></message></iq>"]
    )
    def test_what_is_not_a_message_is_refused(self, raw: bytes) -> None:
        with pytest.raises(StanzaGuardError):
            released_stanza(raw, to="b@c.example", domain="c.example", stamp=AT)

    def test_delay_stamp_is_utc_with_milliseconds(self) -> None:
        other = AT.astimezone(datetime.now().astimezone().tzinfo)
        assert delay_stamp(other) == "2026-03-04T05:06:07.891Z"


class TestMailbox:
    def test_submit_pending_finish_outcome(self, tmp_path: Path) -> None:
        queue = RequestQueue(ReviewPaths.of(tmp_path))
        first = queue.submit(RequestKind.RELEASE, "abc123", " olivia ")
        second = queue.submit(RequestKind.CONFIRM_SPAM, "def456", "oscar")
        pending = queue.pending()
        assert [r for _, r in pending] == [first, second]
        assert first.actor == "olivia"
        path, _ = pending[0]
        queue.finish(path, Outcome(True, "released", "abc123", request_id=first.request_id))
        assert [r for _, r in queue.pending()] == [second]
        done = queue.outcome(first.request_id)
        assert done is not None and done.ok and done.detail == "released"
        assert queue.wait(second.request_id, 0.0) is None

    @pytest.mark.parametrize(("record_id", "actor"), [("../x", "o"), ("abc", ""), ("a", "x\ny")])
    def test_bad_requests_are_refused(self, tmp_path: Path, record_id: str, actor: str) -> None:
        with pytest.raises(StanzaGuardError):
            RequestQueue(ReviewPaths.of(tmp_path)).submit(RequestKind.RELEASE, record_id, actor)

    def test_pending_deliveries_survive_a_restart(self, tmp_path: Path) -> None:
        path = tmp_path / "pending.json"
        pending = PendingDeliveries(path)
        pending.load()
        pending.add("r1", "Bob@Corp.Example", Direction.TO_CLIENT)
        pending.add("r1", "bob@corp.example", Direction.TO_CLIENT)  # once only
        pending.add("r2", "alice@corp.example", Direction.FROM_CLIENT)
        again = PendingDeliveries(path)
        again.load()
        assert again.has("bob@corp.example") and len(again) == 2
        again.remove(again.of("bob@corp.example"))
        assert not again.has("bob@corp.example")
        assert json.loads(path.read_text()) == [
            {"record_id": "r2", "target": "alice@corp.example", "direction": "from-client"}
        ]


def example(
    actor: str,
    record_id: str | None,
    *,
    label: Label = Label.SPAM,
    source: Source = Source.REPORT,
    minutes: int = 0,
) -> LabelledExample:
    return LabelledExample(
        example_id=f"{actor}-{record_id}-{minutes}-{label}",
        at=AT + timedelta(minutes=minutes),
        label=label,
        source=source,
        actor=actor,
        sender="eve@remote.example",
        record_id=record_id,
        text=f"text of {record_id}",
        weight=1.0,
    )


class TestExamples:
    def test_duplicate_reports_count_once(self, tmp_path: Path) -> None:
        examples = LabelledExamples(tmp_path / "examples.jsonl")
        examples.append(example("bob@corp.example", "r1"))
        examples.append(example("bob@corp.example", "r1", minutes=1))
        examples.append(example("carol@corp.example", "r1"))
        effective = examples.effective()
        assert [(e.actor, e.record_id) for e in effective] == [
            ("bob@corp.example", "r1"),
            ("carol@corp.example", "r1"),
        ]
        assert len(list(read_examples(examples.path))) == 3  # the file keeps every line

    def test_contradicted_reporters_weigh_less(self, tmp_path: Path) -> None:
        examples = LabelledExamples(tmp_path / "examples.jsonl")
        for n in range(4):
            examples.append(example("wolf@corp.example", f"r{n}"))
        examples.append(example("good@corp.example", "r9"))
        assert examples.reporter_weight("wolf@corp.example") == 1.0
        for n in range(3):  # officers say three of the wolf's reports were wrong
            examples.append(
                example("olivia", f"r{n}", label=Label.HAM, source=Source.OFFICER, minutes=5)
            )
        examples.append(example("olivia", "r9", label=Label.SPAM, source=Source.OFFICER))
        assert examples.reporter_stats("wolf@corp.example") == (0, 3)
        assert examples.reporter_weight("wolf@corp.example") == pytest.approx(0.25)
        assert examples.reporter_weight("good@corp.example") == 1.0
        effective = {(e.source, e.record_id): e for e in examples.effective()}
        # The officers' labels win over the reports of the same messages.
        assert effective[(Source.OFFICER, "r0")].label is Label.HAM
        assert (Source.REPORT, "r0") not in effective
        assert effective[(Source.REPORT, "r3")].weight == pytest.approx(0.25)

    def test_newest_officer_label_wins(self, tmp_path: Path) -> None:
        examples = LabelledExamples(tmp_path / "examples.jsonl")
        examples.append(example("olivia", "r1", label=Label.SPAM, source=Source.OFFICER))
        examples.append(example("oscar", "r1", label=Label.HAM, source=Source.OFFICER, minutes=1))
        (only,) = examples.effective()
        assert (only.actor, only.label) == ("oscar", Label.HAM)
        reloaded = LabelledExamples.load(examples.path)
        assert reloaded.officer_label("r1") is Label.HAM

    def test_a_torn_last_line_is_skipped(self, tmp_path: Path) -> None:
        path = tmp_path / "examples.jsonl"
        LabelledExamples(path).append(example("bob@corp.example", "r1"))
        with path.open("a") as handle:
            handle.write('{"example_id": "torn", "at": ')
        assert len(LabelledExamples.load(path)) == 1

    def test_replayed_reputation_honours_officers(self, tmp_path: Path) -> None:
        from stanzaguard.learning import Learning

        path = tmp_path / "examples.jsonl"
        examples = LabelledExamples(path)
        examples.append(example("bob@corp.example", "r1"))
        examples.append(example("carol@corp.example", "r2"))
        examples.append(example("olivia", "r2", label=Label.HAM, source=Source.OFFICER))
        ledger = ReputationLedger()

        class NoStore:
            async def get(self, record_id: str) -> None:
                return None

        Learning(path, reputation=ledger, store=NoStore(), indexer=None, clock=_Clock())  # type: ignore[arg-type]
        assert [r.reporter for r in ledger.reports("eve@remote.example")] == ["bob@corp.example"]


class _Clock:
    def now(self) -> datetime:
        return AT

    def monotonic(self) -> float:
        return 0.0
