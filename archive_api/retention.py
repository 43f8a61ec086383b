"""Retention classes and the policy that assigns them; applying a policy to a store.

The policy is the `[retention]` section of a TOML document::

    [retention]
    default = "standard"            # the class of every record no rule matches

    [retention.classes]             # name = duration: N followed by d, w, m (months) or y
    standard = "3y"
    broker-dealer = "6y"
    swaps = "7y"

    [[retention.rules]]             # in order; the first rule that matches decides
    class = "broker-dealer"
    groups = ["traders"]            # either party is in one of these groups (from the policy)
    jids = ["*@desk.corp.example"]  # either party matches one of these (bare JID or *@domain)
    rooms = ["desk@conference.corp.example", "*@conference.corp.example"]
    types = ["chat", "groupchat"]   # what the search language's type: matches

A rule matches when every condition it names holds (one of the listed values each); a rule
with no condition matches everything. Durations are parsed strictly (`6y`; not `6 y`, `06y`,
`6Y`, `6.5y`, `0d` or more than 100 years). A year or month is a calendar step from the
record's time; a day that does not exist in the target month moves to the next month's
first day, so a retention is never shorter than its name says.

Retention is extend-only: `apply_policy` asks the store to record each record's class and
expiry, and the store keeps the later expiry when a record has one already. Parsing and
classification are pure; time comes in as arguments.
"""

from __future__ import annotations

import calendar
import difflib
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from archive_api.errors import RetentionPolicyError
from archive_api.store.base import (
    ArchiveStore,
    RetentionAssignment,
    RetentionSubject,
    RetentionUpdate,
)
from archive_api.store.query import RecordType, normalize_jid
from classifier.errors import RuleError
from classifier.patterns import UserGroup, parse_member_pattern

MAX_DOCUMENT_CHARS = 1024 * 1024
MAX_CLASSES = 1000
MAX_RULES = 10_000
MAX_VALUES = 10_000
MAX_YEARS = 100
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DURATION = re.compile(r"([1-9][0-9]{0,5})([dwmy])")
Unit = Literal["d", "w", "m", "y"]
_UNITS: dict[str, Unit] = {"d": "d", "w": "w", "m": "m", "y": "y"}
# The most of each unit that stays within MAX_YEARS (leap days included).
_MAX_AMOUNT = {"d": 36_525, "w": 5_218, "m": 12 * MAX_YEARS, "y": MAX_YEARS}
_LATEST = datetime.max.replace(tzinfo=UTC)
_RECORD_TYPES = tuple(t.value for t in RecordType if t not in (RecordType.CALL, RecordType.FILE))


@dataclass(frozen=True, slots=True)
class RetentionPeriod:
    amount: int
    unit: Unit

    def __str__(self) -> str:
        return f"{self.amount}{self.unit}"

    def expiry(self, start: datetime) -> datetime:
        """When a record from `start` expires (UTC; the latest datetime when out of range)."""
        start = start.astimezone(UTC) if start.tzinfo is not None else start.replace(tzinfo=UTC)
        try:
            if self.unit in ("d", "w"):
                days = self.amount * (7 if self.unit == "w" else 1)
                return start + timedelta(days=days)
            months = self.amount * (12 if self.unit == "y" else 1)
            return _add_months(start, months)
        except OverflowError:
            return _LATEST


def _add_months(start: datetime, months: int) -> datetime:
    index = start.month - 1 + months
    year, month = start.year + index // 12, index % 12 + 1
    if year > 9999:
        return _LATEST
    if start.day <= calendar.monthrange(year, month)[1]:
        return start.replace(year=year, month=month)
    # The day does not exist there (31 March + 1m): the next month's first day, never earlier.
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    if year > 9999:
        return _LATEST
    return start.replace(year=year, month=month, day=1)


def parse_period(text: str) -> RetentionPeriod:
    """`3y`, `18m`, `26w`, `90d`. Raises ValueError with a reason otherwise."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text[:40]!r} is not a duration: write a whole number without leading zeros "
            "followed by d (days), w (weeks), m (months) or y (years), like '6y'"
        )
    amount, unit = int(match.group(1)), _UNITS[match.group(2)]
    if amount > _MAX_AMOUNT[unit]:
        raise ValueError(f"{text!r} is longer than {MAX_YEARS} years")
    return RetentionPeriod(amount, unit)


@dataclass(frozen=True, slots=True)
class RetentionClass:
    name: str
    period: RetentionPeriod


@dataclass(frozen=True, slots=True)
class RetentionRule:
    retention_class: str
    groups: tuple[UserGroup, ...] = ()
    jids: tuple[str, ...] = ()  # normalised member patterns: user@domain or *@domain
    rooms: tuple[str, ...] = ()  # normalised room JIDs or *@service
    types: tuple[str, ...] = ()

    def matches(self, subject: RetentionSubject) -> bool:
        parties = [p for p in (subject.sender, subject.recipient) if p]
        if self.types and subject.record_type not in self.types:
            return False
        if self.rooms:
            room = normalize_jid(subject.room) if subject.room else None
            if room is None or not any(_jid_matches(pattern, room) for pattern in self.rooms):
                return False
        if self.jids and not any(
            _jid_matches(pattern, party) for pattern in self.jids for party in parties
        ):
            return False
        return not self.groups or any(
            group.contains(party) for group in self.groups for party in parties
        )


def _jid_matches(pattern: str, jid: str) -> bool:
    bare = normalize_jid(jid).split("/", 1)[0]
    if pattern.startswith("*@"):
        return bare.rpartition("@")[2] == pattern[2:]
    return bare == pattern


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    classes: tuple[RetentionClass, ...]
    default: str
    rules: tuple[RetentionRule, ...] = ()

    def period_of(self, name: str) -> RetentionPeriod:
        for cls in self.classes:
            if cls.name == name:
                return cls.period
        raise KeyError(name)

    def classify(self, subject: RetentionSubject) -> RetentionAssignment:
        """The class the first matching rule (or the default) gives, and its expiry."""
        name = next((r.retention_class for r in self.rules if r.matches(subject)), self.default)
        return RetentionAssignment(
            subject.record_id, name, self.period_of(name).expiry(subject.occurred_at)
        )


# --- parsing -------------------------------------------------------------------------------


def _fail(path: str, problem: str) -> RetentionPolicyError:
    return RetentionPolicyError(f"{path}: {problem}", key=path)


def _kind(value: object) -> str:
    for types, name in (
        (bool, "a boolean"),
        (str, "a string"),
        (int, "an integer"),
        (float, "a float"),
        ((list, tuple), "an array"),
        (Mapping, "a table"),
    ):
        if isinstance(value, types):
            return name
    return "a date/time" if isinstance(value, datetime) else type(value).__name__


def _table(value: object, path: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise _fail(path, f"must be a table, got {_kind(value)}")
    return value


def _check_keys(table: Mapping[str, object], path: str, known: Iterable[str]) -> None:
    known = tuple(known)
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _fail(f"{path}.{key[:60]}", f"unknown key{hint}; known keys: {', '.join(known)}")


def _string_list(value: object, path: str) -> list[str]:
    if not isinstance(value, list):
        raise _fail(path, f"must be an array of strings, got {_kind(value)}")
    if not value:
        raise _fail(path, "must not be empty (leave the key out to match everything)")
    if len(value) > MAX_VALUES:
        raise _fail(path, f"has {len(value)} entries; at most {MAX_VALUES} are allowed")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _fail(f"{path}[{i}]", f"must be a string, got {_kind(item)}")
    return value


def _name(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, f"must be a string, got {_kind(value)}")
    if not _NAME.fullmatch(value):
        raise _fail(path, f"{value[:60]!r}: names are 1-64 letters, digits, '_' or '-'")
    return value


def _classes(value: object) -> tuple[RetentionClass, ...]:
    path = "retention.classes"
    table = _table(value, path)
    if not table:
        raise _fail(path, "must define at least one class")
    if len(table) > MAX_CLASSES:
        raise _fail(path, f"has {len(table)} classes; at most {MAX_CLASSES} are allowed")
    classes = []
    for name, raw in table.items():
        where = f"{path}.{name[:60]}"
        _name(name, where)
        if not isinstance(raw, str):
            raise _fail(where, f"must be a duration string like '6y', got {_kind(raw)}")
        try:
            classes.append(RetentionClass(name, parse_period(raw)))
        except ValueError as exc:
            raise _fail(where, str(exc)) from None
    return tuple(classes)


def _patterns(value: object, path: str, *, rooms: bool) -> tuple[str, ...]:
    out = []
    for i, raw in enumerate(_string_list(value, path)):
        try:
            pattern = parse_member_pattern(raw)
        except RuleError as exc:
            what = "a room JID or *@service" if rooms else "a bare JID or *@domain"
            raise _fail(f"{path}[{i}]", f"{exc} (expected {what})") from None
        out.append(pattern)
    return tuple(dict.fromkeys(out))


def _rule(
    value: object, index: int, classes: set[str], groups: Mapping[str, UserGroup]
) -> RetentionRule:
    path = f"retention.rules[{index}]"
    table = _table(value, path)
    _check_keys(table, path, ("class", "groups", "jids", "rooms", "types"))
    if "class" not in table:
        raise _fail(f"{path}.class", "is required (the retention class this rule assigns)")
    cls = _name(table["class"], f"{path}.class")
    if cls not in classes:
        raise _fail(f"{path}.class", f"no class {cls!r} in [retention.classes]")
    chosen_groups: list[UserGroup] = []
    if "groups" in table:
        for i, name in enumerate(_string_list(table["groups"], f"{path}.groups")):
            if name not in groups:
                known = ", ".join(sorted(groups)[:20]) or "none"
                raise _fail(
                    f"{path}.groups[{i}]", f"no group {name[:60]!r} in the policy (known: {known})"
                )
            chosen_groups.append(groups[name])
    types: tuple[str, ...] = ()
    if "types" in table:
        raw_types = _string_list(table["types"], f"{path}.types")
        for i, kind in enumerate(raw_types):
            if kind not in _RECORD_TYPES:
                raise _fail(
                    f"{path}.types[{i}]",
                    f"unknown type {kind[:40]!r}; expected one of {', '.join(_RECORD_TYPES)}",
                )
        types = tuple(dict.fromkeys(raw_types))
    return RetentionRule(
        retention_class=cls,
        groups=tuple(chosen_groups),
        jids=_patterns(table["jids"], f"{path}.jids", rooms=False) if "jids" in table else (),
        rooms=_patterns(table["rooms"], f"{path}.rooms", rooms=True) if "rooms" in table else (),
        types=types,
    )


def retention_from_dict(
    data: Mapping[str, object], *, groups: Mapping[str, UserGroup] | None = None
) -> RetentionPolicy:
    """Validate a parsed document that has a `[retention]` section (other sections are the
    rest of the policy's business and are left alone). `groups` are the user groups rules
    may name, by name (from the policy's `[groups]`)."""
    if "retention" not in data:
        raise RetentionPolicyError("the document has no [retention] section", key="retention")
    table = _table(data["retention"], "retention")
    _check_keys(table, "retention", ("default", "classes", "rules"))
    if "classes" not in table:
        raise _fail("retention.classes", "is required (name = duration, like standard = '3y')")
    classes = _classes(table["classes"])
    names = {c.name for c in classes}
    if "default" not in table:
        raise _fail("retention.default", "is required (the class of records no rule matches)")
    default = _name(table["default"], "retention.default")
    if default not in names:
        raise _fail("retention.default", f"no class {default!r} in [retention.classes]")
    raw_rules = table.get("rules", [])
    if not isinstance(raw_rules, list):
        raise _fail("retention.rules", f"must be an array of tables, got {_kind(raw_rules)}")
    if len(raw_rules) > MAX_RULES:
        raise _fail("retention.rules", f"has {len(raw_rules)} rules; at most {MAX_RULES}")
    known_groups = dict(groups or {})
    rules = tuple(_rule(raw, i, names, known_groups) for i, raw in enumerate(raw_rules))
    return RetentionPolicy(classes, default, rules)


def parse_retention(
    text: str | bytes, *, groups: Mapping[str, UserGroup] | None = None
) -> RetentionPolicy:
    """Parse the `[retention]` section of a TOML document (bytes must be UTF-8)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RetentionPolicyError(f"the document is not UTF-8: {exc}") from None
    if len(text) > MAX_DOCUMENT_CHARS:
        raise RetentionPolicyError(f"the document is larger than {MAX_DOCUMENT_CHARS} characters")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RetentionPolicyError(f"the document is not valid TOML: {exc}") from None
    except (ValueError, RecursionError) as exc:  # hostile input: huge integers, deep nesting
        raise RetentionPolicyError(
            f"the document could not be read: {type(exc).__name__}"
        ) from None
    return retention_from_dict(data, groups=groups)


# --- applying a policy to a store ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApplyOutcome:
    examined: int
    update: RetentionUpdate


Which = Literal["all", "unassigned", "due"]


async def apply_policy(
    store: ArchiveStore,
    policy: RetentionPolicy,
    *,
    now: datetime,
    which: Which = "all",
    page_size: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> ApplyOutcome:
    """Classify records a page at a time and record their retention, extend-only.

    `which`: "unassigned" classifies just the records that have none yet (new ones, after
    indexing); "due" re-examines the records whose recorded expiry is at or before `now`
    (so a purge never acts on a retention the current policy has lengthened); "all"
    re-examines every record (after a policy change). Expiries only ever move later.
    """
    if which not in ("all", "unassigned", "due"):
        raise ValueError(f"unknown selection {which!r}")
    examined = 0
    totals = RetentionUpdate()
    cursor: str | None = None
    while True:
        page = await store.retention_subjects(
            cursor=cursor,
            limit=page_size,
            unassigned_only=which == "unassigned",
            expiring_by=now if which == "due" else None,
        )
        if page.subjects:
            update = await store.set_retention(
                [policy.classify(s) for s in page.subjects], assigned_at=now
            )
            totals = RetentionUpdate(
                totals.assigned + update.assigned,
                totals.extended + update.extended,
                totals.kept + update.kept,
                totals.unknown + update.unknown,
            )
            examined += len(page.subjects)
            if progress is not None:
                progress(examined)
        if page.next_cursor is None:
            return ApplyOutcome(examined, totals)
        cursor = page.next_cursor
