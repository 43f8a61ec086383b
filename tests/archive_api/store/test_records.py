"""`SpoolEntry.payload` takes orjson where it can: it must be json's canonical bytes exactly.

The hash chain covers these bytes, so a single differing byte would make every archive
written before the change fail `verify`. The property below compares the fast path with
`canonical_json(entry.to_json())` on random entries, floats in every range included.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archive_api.store import records as records_module
from archive_api.store.records import (
    ArchiveRecord,
    Attachment,
    AttachmentFetch,
    Direction,
    EntryOp,
    ExchangeDetails,
    FetchStatus,
    Observation,
    ObservationVia,
    RecordKind,
    RecordStatus,
    SpoolEntry,
    StanzaIdRef,
    canonical_json,
    iso_datetime,
)
from classifier.verdict import Action, Reason, Verdict

# Surrogates are in on purpose: orjson refuses them, json refuses them when encoding; the
# outcome must be json's either way.
_TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=40)
_OPTIONAL_TEXT = st.none() | _TEXT
_FLOATS = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(min_value=-1e-3, max_value=1e-3)
    | st.sampled_from([0.0, -0.0, 1e-4, 9.999999999999999e-05, 1e16, 9999999999999998.0])
)
_INTS = st.none() | st.integers(min_value=-(2**70), max_value=2**70)
_MOMENTS = st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
) | st.datetimes(timezones=st.just(timezone(timedelta(hours=5, minutes=30))))

_REASONS = st.builds(
    Reason,
    rule_id=_TEXT,
    detail=_TEXT,
    contribution=_FLOATS,
    action=st.sampled_from(list(Action)),
)
_VERDICTS = st.builds(
    Verdict,
    action=st.sampled_from(list(Action)),
    score=_FLOATS,
    reasons=st.lists(_REASONS, max_size=3).map(tuple),
    policy_fingerprint=_OPTIONAL_TEXT,
)
_OBSERVATIONS = st.builds(
    Observation,
    at=_MOMENTS,
    jid=_TEXT,
    via=st.sampled_from(list(ObservationVia)),
    direction=st.sampled_from(list(Direction)),
)
_ATTACHMENTS = st.builds(
    Attachment,
    url=_TEXT,
    source=st.sampled_from(["oob", "sims", "upload"]),
    media_type=_OPTIONAL_TEXT,
    name=_OPTIONAL_TEXT,
    size=_INTS,
    sha256=_OPTIONAL_TEXT,
)
_EXCHANGES = st.none() | st.builds(
    ExchangeDetails,
    protocol=st.sampled_from(["jingle", "si", "ibb"]),
    action=_TEXT,
    sid=_TEXT,
    duration_seconds=st.none() | _FLOATS,
    seq=_INTS,
)
_RECORDS = st.builds(
    ArchiveRecord,
    record_id=_TEXT,
    kind=st.sampled_from(list(RecordKind)),
    occurred_at=_MOMENTS,
    direction=st.sampled_from(list(Direction)),
    sender=_TEXT,
    recipient=_TEXT,
    body=_OPTIONAL_TEXT,
    subject=_OPTIONAL_TEXT,
    message_id=_OPTIONAL_TEXT,
    stanza_ids=st.lists(st.builds(StanzaIdRef, id=_TEXT, by=_TEXT), max_size=2).map(tuple),
    attachments=st.lists(_ATTACHMENTS, max_size=2).map(tuple),
    delay_stamp=st.none() | _MOMENTS,
    exchange=_EXCHANGES,
    verdict=_VERDICTS,
    status=st.sampled_from(list(RecordStatus)),
    raw=st.binary(max_size=64),
    observations=st.lists(_OBSERVATIONS, max_size=3).map(tuple),
)
_FETCHES = st.builds(
    AttachmentFetch,
    url=_TEXT,
    status=st.sampled_from(list(FetchStatus)),
    attempt=st.integers(min_value=-(2**70), max_value=2**70),
    sha256=_OPTIONAL_TEXT,
    size=_INTS,
    media_type=_OPTIONAL_TEXT,
    error=_OPTIONAL_TEXT,
)
_ENTRIES = st.builds(
    SpoolEntry,
    op=st.sampled_from(list(EntryOp)),
    record_id=_TEXT,
    record=st.none() | _RECORDS,
    observation=st.none() | _OBSERVATIONS,
    status=st.none() | st.sampled_from(list(RecordStatus)),
    actor=_OPTIONAL_TEXT,
    at=st.none() | _MOMENTS,
    fetch=st.none() | _FETCHES,
)


class _StampSubclass(datetime):
    def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
        return "mine"


_ANY_ZONE = (
    st.none()
    | st.just(UTC)
    | st.timezones()
    | st.builds(
        timezone, st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23))
    )
)


@settings(max_examples=2000, deadline=None)
@given(st.datetimes(timezones=_ANY_ZONE) | st.datetimes(timezones=st.just(UTC)))
def test_iso_datetime_is_isoformat(moment: datetime) -> None:
    # The hash chain covers these strings: any difference would change every entry's bytes.
    assert iso_datetime(moment) == moment.isoformat()


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 23, 20, 41, 5, 123456, tzinfo=UTC),
        datetime(2026, 11, 23, 20, 41, 5, tzinfo=UTC),  # no fraction printed
        datetime(2026, 1, 2, 3, 4, 5, 7, tzinfo=UTC),  # a fraction with leading zeros
        datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # a three-digit year
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime.fromisoformat("2026-11-23T00:00:00Z"),  # parsed: the same UTC singleton
        datetime(2026, 11, 23, tzinfo=timezone(timedelta(0))),  # UTC, but another object
        datetime(2026, 11, 23, tzinfo=timezone(timedelta(hours=5, minutes=30, seconds=7))),
        datetime(2026, 11, 23, 1, 2, 3),  # naive
    ],
)
def test_iso_datetime_on_the_edges(moment: datetime) -> None:
    assert iso_datetime(moment) == moment.isoformat()


def test_iso_datetime_leaves_a_subclass_its_own_isoformat() -> None:
    assert iso_datetime(_StampSubclass(2026, 11, 23, tzinfo=UTC)) == "mine"


def _outcome(make: object) -> bytes | type[BaseException]:
    try:
        result = make()  # type: ignore[operator]
    except Exception as exc:  # the kind of failure is part of what must not change
        return type(exc)
    assert isinstance(result, bytes)
    return result


def test_orjson_agrees_with_json_on_this_installation() -> None:
    # If this fails, the fast path is off (correct, only slower): find out what changed.
    assert records_module._ORJSON_AGREES


@settings(max_examples=600, deadline=None)
@given(_ENTRIES)
def test_payload_is_canonical_json_byte_for_byte(entry: SpoolEntry) -> None:
    assert _outcome(entry.payload) == _outcome(lambda: canonical_json(entry.to_json()))


def _entry(body: str, verdict: Verdict | None = None) -> SpoolEntry:
    record = ArchiveRecord(
        record_id="r1",
        kind=RecordKind.MESSAGE,
        occurred_at=datetime(2026, 11, 23, tzinfo=UTC),
        direction=Direction.FROM_CLIENT,
        body=body,
        verdict=verdict or Verdict(Action.ALLOW),
    )
    return SpoolEntry(EntryOp.RECORD, "r1", record)


@pytest.mark.parametrize(
    "score",
    [1e-05, 2.5e-07, 5e-324, -1e-4 / 3, 1e16, 1.5e300, math.inf, -math.inf, math.nan],
)
def test_floats_json_writes_differently_are_left_to_json(score: float) -> None:
    reason = Reason("model", "spammy", score, Action.FLAG)
    entry = _entry("hi", Verdict(Action.FLAG, score, (reason,)))
    assert entry.payload() == canonical_json(entry.to_json())
    assert not entry._floats_print_alike()


def test_plain_entries_take_the_fast_path() -> None:
    reason = Reason("lexicon", "word", 0.25, Action.FLAG)
    entry = _entry(
        'caf\u00e9 \u2028 \U0001f600 "quoted" \\ \x00\x1f\x7f',
        Verdict(Action.FLAG, 0.75, (reason,)),
    )
    assert entry._floats_print_alike()
    assert entry.payload() == canonical_json(entry.to_json())


def test_a_lone_surrogate_fails_as_it_did_before() -> None:
    with pytest.raises(UnicodeEncodeError):
        _entry("\ud800").payload()
