"""Retention classes: strict durations, the `[retention]` section, rules, extend-only apply."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from archive_api.errors import RetentionPolicyError
from archive_api.retention import (
    RetentionPeriod,
    RetentionPolicy,
    apply_policy,
    parse_period,
    parse_retention,
)
from archive_api.store.base import RetentionSubject, RetentionUpdate
from archive_api.store.sqlite import SqliteStore
from classifier.patterns import UserGroup
from tests.archive_api.store.conformance import ALL, T0, ChainWriter, corpus, record

NOW = T0 + timedelta(days=30)

POLICY = """
[retention]
default = "standard"

[retention.classes]
standard = "3y"
broker-dealer = "6y"
swaps = "7y"
short = "90d"

[[retention.rules]]
class = "swaps"
groups = ["traders"]

[[retention.rules]]
class = "broker-dealer"
rooms = ["*@conference.corp.example"]

[[retention.rules]]
class = "short"
types = ["subscription", "session"]

[[retention.rules]]
class = "broker-dealer"
jids = ["*@partner.example"]
types = ["chat"]
"""

GROUPS = {"traders": UserGroup.of("traders", ["carol@corp.example", "*@desk.corp.example"])}


def subject(
    *,
    sender: str = "alice@corp.example",
    recipient: str = "bob@other.example",
    room: str | None = None,
    record_type: str = "chat",
    at: datetime = T0,
) -> RetentionSubject:
    return RetentionSubject("x", at, record_type, "from-client", sender, recipient, room)


# --- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "period"),
    [
        ("3y", RetentionPeriod(3, "y")),
        ("18m", RetentionPeriod(18, "m")),
        ("26w", RetentionPeriod(26, "w")),
        ("90d", RetentionPeriod(90, "d")),
        ("100y", RetentionPeriod(100, "y")),
        ("1200m", RetentionPeriod(1200, "m")),
        ("36525d", RetentionPeriod(36525, "d")),
    ],
)
def test_durations_parse(text: str, period: RetentionPeriod) -> None:
    assert parse_period(text) == period
    assert str(period) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "y",
        "3",
        "0d",
        "0y",
        "03y",
        "3Y",
        "3 y",
        " 3y",
        "3y ",
        "3.5y",
        "-1y",
        "+3y",
        "3yy",
        "3h",
        "3years",
        "101y",
        "1201m",
        "36526d",
        "5219w",
        "9999999y",
        "٣y",  # an Arabic-Indic digit: only ASCII digits count
        "3y\n",
        "1e3d",
    ],
)
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_period(text)


@pytest.mark.parametrize(
    ("period", "start", "expiry"),
    [
        ("3y", datetime(2026, 1, 15, 12, tzinfo=UTC), datetime(2029, 1, 15, 12, tzinfo=UTC)),
        ("1y", datetime(2024, 2, 29, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC)),
        ("1m", datetime(2026, 1, 31, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)),
        ("1m", datetime(2026, 12, 31, tzinfo=UTC), datetime(2027, 1, 31, tzinfo=UTC)),
        ("2w", datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 15, tzinfo=UTC)),
        ("1d", datetime(2026, 1, 1, 23, 59, tzinfo=UTC), datetime(2026, 1, 2, 23, 59, tzinfo=UTC)),
        ("7y", datetime(9995, 6, 1, tzinfo=UTC), datetime.max.replace(tzinfo=UTC)),
        ("90d", datetime(9999, 12, 1, tzinfo=UTC), datetime.max.replace(tzinfo=UTC)),
    ],
)
def test_expiry_is_calendar_based_and_never_short(
    period: str, start: datetime, expiry: datetime
) -> None:
    assert parse_period(period).expiry(start) == expiry


def test_expiry_of_a_naive_or_offset_time_is_utc() -> None:
    offset = datetime(2026, 1, 1, 1, tzinfo=UTC).astimezone()
    assert parse_period("1d").expiry(offset) == datetime(2026, 1, 2, 1, tzinfo=UTC)
    assert parse_period("1d").expiry(datetime(2026, 1, 1)) == datetime(2026, 1, 2, tzinfo=UTC)


# --- the policy ------------------------------------------------------------------------------


@pytest.fixture
def policy() -> RetentionPolicy:
    return parse_retention(POLICY, groups=GROUPS)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (subject(), "standard"),
        (subject(sender="carol@corp.example"), "swaps"),
        (subject(recipient="x@desk.corp.example"), "swaps"),  # either party
        (
            subject(room="desk@conference.corp.example", record_type="groupchat"),
            "broker-dealer",
        ),
        (subject(sender="carol@corp.example", room="desk@conference.corp.example"), "swaps"),
        (subject(record_type="subscription"), "short"),
        (subject(recipient="bob@partner.example"), "broker-dealer"),
        (subject(recipient="bob@partner.example", record_type="normal"), "standard"),
        (subject(recipient="bob@sub.partner.example"), "standard"),  # *@ is exact
        (subject(sender="Carol@CORP.example/phone"), "swaps"),
    ],
)
def test_first_matching_rule_decides(
    policy: RetentionPolicy, case: RetentionSubject, expected: str
) -> None:
    assignment = policy.classify(case)
    assert assignment.retention_class == expected
    assert assignment.expires_at == policy.period_of(expected).expiry(case.occurred_at)


def test_a_minimal_policy_and_one_inside_a_bigger_document() -> None:
    minimal = parse_retention(b'[retention]\ndefault = "k"\nclasses = { k = "7y" }\n')
    assert minimal.classify(subject()).retention_class == "k"
    bigger = parse_retention('version = 1\nlocal_domains = ["x.example"]\n' + POLICY, groups=GROUPS)
    assert len(bigger.rules) == 4


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("version = 1", "retention", "no [retention] section"),
        ("[retention]\nclasses = {}", "retention.classes", "at least one class"),
        ('[retention]\ndefault = "a"', "retention.classes", "is required"),
        ('[retention]\nclasses = { a = "1y" }', "retention.default", "is required"),
        ('[retention]\ndefault = "b"\nclasses = { a = "1y" }', "retention.default", "no class"),
        ('[retention]\ndefault = "a"\nclasses = { a = "forever" }', "retention.classes.a", "not a"),
        ('[retention]\ndefault = "a"\nclasses = { a = 3 }', "retention.classes.a", "integer"),
        ('[retention]\ndefault = "a"\nclasses = { a = "0d" }', "retention.classes.a", "not a"),
        ('[retention]\ndefault = "a"\nclasses = { a = "200y" }', "retention.classes.a", "100"),
        ('[retention]\ndefault = "a b"\nclasses = { "a b" = "1y" }', "retention.classes.a b", ""),
        ('[retention]\ndefualt = "a"\nclasses = { a = "1y" }', "retention.defualt", "default"),
        ('retention = "3y"', "retention", "table"),
        (
            '[retention]\ndefault = "a"\nclasses = { a = "1y" }\nrules = { class = "a" }',
            "retention.rules",
            "array",
        ),
        (
            '[retention]\ndefault = "a"\nclasses = { a = "1y" }\n[[retention.rules]]\n'
            'jids = ["x@y.example"]',
            "retention.rules[0].class",
            "is required",
        ),
        (
            '[retention]\ndefault = "a"\nclasses = { a = "1y" }\n[[retention.rules]]\nclass = "z"',
            "retention.rules[0].class",
            "no class",
        ),
        (
            '[retention]\ndefault = "a"\nclasses = { a = "1y" }\n[[retention.rules]]\n'
            'class = "a"\ngroups = ["nobody"]',
            "retention.rules[0].groups[0]",
            "no group",
        ),
        (
            '[retention]\ndefault = "a"\nclasses = { a = "1y" }\n[[retention.rules]]\n'
            'class = "a"\ntypes = ["email"]',
            "retention.rules[0].types[0]",
            "unknown type",
        ),
        (
            '[retention]\ndefault = "a"\nclasses = { a = "1y" }\n[[retention.rules]]\n'
            'class = "a"\njids = ["x@y.example/res"]',
            "retention.rules[0].jids[0]",
            "bare JID",
        ),
        (
            '[retention]\ndefault = "a"\nclasses = { a = "1y" }\n[[retention.rules]]\n'
            'class = "a"\njids = []',
            "retention.rules[0].jids",
            "must not be empty",
        ),
        (
            '[retention]\ndefault = "a"\nclasses = { a = "1y" }\n[[retention.rules]]\n'
            'class = "a"\nrooms = "r@c.example"',
            "retention.rules[0].rooms",
            "array",
        ),
        (
            '[retention]\ndefault = "a"\nclasses = { a = "1y" }\n[[retention.rules]]\n'
            'class = "a"\njids = [1]',
            "retention.rules[0].jids[0]",
            "integer",
        ),
        (
            '[retention]\ndefault = "a"\nclasses = { a = "1y" }\n[[retention.rules]]\n'
            'class = "a"\nroom = ["r@c.example"]',
            "retention.rules[0].room",
            "rooms",
        ),
    ],
)
def test_policy_errors_name_the_key(text: str, key: str, words: str) -> None:
    with pytest.raises(RetentionPolicyError) as caught:
        parse_retention(text, groups=GROUPS)
    assert caught.value.key == key
    assert words in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        "[retention",  # malformed TOML
        b"\xff\xfe[retention]",  # not UTF-8
        "a = " + "[" * 50_000 + "]" * 50_000,  # deep nesting
        "a = " + "9" * 100_000,  # an absurd integer
        "# " + "x" * (1024 * 1024 + 1),  # too big
        "[retention]\ndefault = 'a'\nclasses = { a = '1y' }\n[[retention.rules]]\nclass = 'a'\n"
        + "jids = ["
        + ", ".join(['"a@b.example"'] * 10_001)
        + "]",
    ],
)
def test_hostile_documents_are_refused_cleanly(text: str | bytes) -> None:
    with pytest.raises(RetentionPolicyError):
        parse_retention(text)


def test_too_many_classes_are_refused() -> None:
    classes = ", ".join(f"c{i} = '1y'" for i in range(1001))
    with pytest.raises(RetentionPolicyError, match="at most 1000"):
        parse_retention(f"[retention]\ndefault = 'c0'\nclasses = {{ {classes} }}")


# --- applying a policy: extend-only ----------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "archive.db")
    try:
        await opened.apply(ChainWriter().records(*corpus()))
        yield opened
    finally:
        await opened.close()


def one_class(duration: str) -> RetentionPolicy:
    return parse_retention(
        f'[retention]\ndefault = "c{duration}"\nclasses = {{ c{duration} = "{duration}" }}'
    )


async def test_applying_a_shorter_policy_keeps_the_longer_retention(store: SqliteStore) -> None:
    six = await apply_policy(store, one_class("6y"), now=NOW)
    assert (six.examined, six.update) == (15, RetentionUpdate(assigned=15))
    three = await apply_policy(store, one_class("3y"), now=NOW, page_size=4)
    assert (three.examined, three.update) == (15, RetentionUpdate(kept=15))
    state = await store.retention_of("r01")
    assert state is not None and state.retention_class == "c6y"
    assert state.expires_at == datetime(2032, 1, 15, 12, tzinfo=UTC)
    seven = await apply_policy(store, one_class("7y"), now=NOW)
    assert seven.update == RetentionUpdate(extended=15)
    state = await store.retention_of("r01")
    assert state is not None and (state.retention_class, state.assigned_at) == ("c7y", NOW)
    # The shorter policy cannot make anything purgeable: nothing is due even years on.
    await apply_policy(store, one_class("90d"), now=NOW)
    assert (await store.purge(datetime(2030, 1, 1, tzinfo=UTC), dry_run=True)).purged == ()


async def test_new_records_are_classified_on_their_own(store: SqliteStore) -> None:
    await apply_policy(store, one_class("3y"), now=NOW)
    writer = ChainWriter()
    await store.apply(writer.records(record("n1", at=T0)), chain="proxy-2")
    seen: list[int] = []
    outcome = await apply_policy(
        store, one_class("6y"), now=NOW, which="unassigned", progress=seen.append
    )
    assert (outcome.examined, outcome.update, seen) == (1, RetentionUpdate(assigned=1), [1])
    old = await store.retention_of("r01")
    assert old is not None and old.retention_class == "c3y"


async def test_due_records_are_reexamined_before_a_purge(store: SqliteStore) -> None:
    await apply_policy(store, one_class("90d"), now=NOW)
    later = T0 + timedelta(days=200)
    due = await store.purge(later, dry_run=True, counts=True)
    assert due.due == len(ALL)
    # The policy was lengthened meanwhile: re-examining the due records saves them all.
    outcome = await apply_policy(store, one_class("1y"), now=later, which="due")
    assert outcome.update == RetentionUpdate(extended=len(ALL))
    assert (await store.purge(later, dry_run=True, counts=True)).due == 0
    with pytest.raises(ValueError):
        await apply_policy(store, one_class("1y"), now=later, which="some")  # type: ignore[arg-type]
