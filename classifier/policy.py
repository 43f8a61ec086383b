"""The policy document: parsing, validation, canonical form, and turning it into a chain.

A policy is TOML text (or the equivalent dict, e.g. from the API) like::

    version = 1
    local_domains = ["corp.example", "traders.corp.example", "conference.corp.example"]

    [groups.traders]
    members = ["*@traders.corp.example", "alice@corp.example"]

    [federation]
    mode = "deny"                      # or "allow"
    domains = ["spam.example", "*.spam.example"]
    action = "reject"                  # what a refusal does: flag, quarantine, reject, drop

    [federation.groups.traders]        # replaces the default list for members of traders
    mode = "allow"
    domains = ["partner.example", "*.partner.example"]

    [decision]
    failure_action = "quarantine"      # a failing rule counts as this; never "allow"
    quarantine_threshold = 5.0
    reject_threshold = 10.0

``version`` is the version of this document *format* (only 1 exists); which revision of a
policy decided a verdict is recorded by `policy_fingerprint`. Every key is checked: unknown
keys, at any level, are errors that list the known ones, so a typo never silently disables a
rule. Parsing is pure; reading the file and watching it for changes is the edge's job.

The anti-SPIM and compliance sections (``[strangers]``, ``[blocklists]``, ``[[barriers]]``,
``[encryption]``, ``[limits]``, ``[duplicates]``, ``[[lexicons]]``, ``[model]``,
``[reputation]``) are optional;
an absent one adds no rule and no key to the canonical form. docs/policy.md lists every key.

To add a section: add a frozen dataclass, a ``_parse_<section>`` function, its key in
``_TOP_LEVEL_KEYS``, its canonical form in `policy_to_dict`, and its rules in `build_chain`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import threading
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any

from classifier.barriers import Barrier, BarrierRule
from classifier.blocklists import POLICY_SOURCE, BlockList, BlocklistRule, ListKind, parse_entry
from classifier.chain import RuleChain, RuleMetrics, Thresholds
from classifier.context import DecisionContext, Direction
from classifier.encryption import KNOWN_METHODS, OTHER, EncryptionRule
from classifier.errors import PolicyError, RuleError
from classifier.lexicons import Lexicon, LexiconRule
from classifier.limits import (
    CounterStore,
    DuplicateRule,
    InMemoryCounterStore,
    LimitKind,
    RateLimitRule,
)
from classifier.patterns import UserGroup, parse_domain_pattern, parse_member_pattern
from classifier.reputation import ReputationLedger, ReputationRule
from classifier.rules import DomainList, FederationMode, FederationRule, Rule
from classifier.scoring import ModelRule, ModelThresholds, TextScorer
from classifier.trust import StrangerRule, TrustResolver, TrustStore
from classifier.verdict import Action, Verdict

CURRENT_VERSION = 1
SUPPORTED_VERSIONS = frozenset({CURRENT_VERSION})
MAX_POLICY_CHARS = 16 * 1024 * 1024
MAX_LIST_ENTRIES = 100_000
MAX_GROUPS = 10_000
_GROUP_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_REFUSAL_ACTIONS = (Action.FLAG, Action.QUARANTINE, Action.REJECT, Action.DROP)
_ALL_ACTIONS = (Action.ALLOW, *_REFUSAL_ACTIONS)
_INBOUND = (Direction.INBOUND,)
MAX_LIMIT = 10_000_000
MAX_WINDOW_SECONDS = 7 * 24 * 3600.0
MAX_REASON_CHARS = 500
MAX_MODEL_WEIGHT = 1e6
MAX_HALF_LIFE_HOURS = 365 * 24.0
DEFAULT_STRANGERS_QUARANTINE_AT = 0.7


# --- the model ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupPolicy:
    """A named group of local users; ``members`` are normalised patterns, sorted."""

    name: str
    members: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GroupFederation:
    """A group's own federation list; ``domains`` are normalised patterns, sorted."""

    group: str
    mode: FederationMode
    domains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FederationPolicy:
    """Which remote domains local users may talk to. The default permits everything."""

    mode: FederationMode = FederationMode.DENY
    domains: tuple[str, ...] = ()
    action: Action = Action.REJECT
    groups: tuple[GroupFederation, ...] = ()  # sorted by group name


@dataclass(frozen=True, slots=True)
class DecisionPolicy:
    """How the chain combines results."""

    failure_action: Action = Action.QUARANTINE
    quarantine_threshold: float | None = None
    reject_threshold: float | None = None


@dataclass(frozen=True, slots=True)
class StrangerPolicy:
    """How stanzas from strangers (not in the recipient's roster) are treated.

    Attributes:
        quarantine_threshold: Score threshold for strangers; ``None``: the [decision] one.
        reject_threshold: Likewise for rejecting.
        first_contact_url: What a stranger's stanza carrying a URL gets.
        unknown_is_stranger: Whether a sender of unknown relationship counts as a stranger.
    """

    quarantine_threshold: float | None = None
    reject_threshold: float | None = None
    first_contact_url: Action = Action.QUARANTINE
    unknown_is_stranger: bool = False


@dataclass(frozen=True, slots=True)
class BlocklistPolicy:
    """Block lists written in the policy, and how every block list's hits are handled.

    Entries are normalised and sorted; ``kind_actions`` and ``source_actions`` are sorted
    ``(key, action)`` pairs.
    """

    domains: tuple[str, ...] = ()
    jids: tuple[str, ...] = ()
    jid_sha256: tuple[str, ...] = ()
    url_hosts: tuple[str, ...] = ()
    action: Action = Action.REJECT
    kind_actions: tuple[tuple[ListKind, Action], ...] = ()
    source_actions: tuple[tuple[str, Action], ...] = ()
    directions: tuple[Direction, ...] = _INBOUND
    exempt_contacts: bool = True


@dataclass(frozen=True, slots=True)
class BarrierPolicy:
    """An information barrier between two groups (``between`` is sorted)."""

    between: tuple[str, str]
    reason: str | None = None
    action: Action = Action.REJECT


@dataclass(frozen=True, slots=True)
class EncryptionPolicy:
    """Action per end-to-end encryption method; ``other`` covers unknown markers."""

    omemo: Action = Action.ALLOW
    openpgp: Action = Action.ALLOW
    otr: Action = Action.ALLOW
    other: Action = Action.ALLOW


@dataclass(frozen=True, slots=True)
class LimitsPolicy:
    """Per-minute rate and fan-out limits; 0 disables a limit."""

    per_sender_per_minute: int = 60
    new_recipients_per_minute: int = 20
    per_domain_per_minute: int = 600
    action: Action = Action.QUARANTINE
    directions: tuple[Direction, ...] = _INBOUND
    exempt_contacts: bool = True


@dataclass(frozen=True, slots=True)
class DuplicatesPolicy:
    """Duplicate-body burst detection."""

    recipients: int = 5
    window_seconds: float = 300.0
    action: Action = Action.QUARANTINE
    directions: tuple[Direction, ...] = _INBOUND
    exempt_contacts: bool = True


@dataclass(frozen=True, slots=True)
class LexiconPolicy:
    """A lexicon: its name and its terms as written (sorted, without duplicates)."""

    name: str
    terms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    """How the text model's spam probability is used (thresholds in [0, 1]; None: off).

    The strangers' thresholds are stored resolved: never above the general ones.
    """

    weight: float = 1.0
    flag_at: float | None = None
    quarantine_at: float | None = 0.9
    reject_at: float | None = None
    strangers_quarantine_at: float | None = DEFAULT_STRANGERS_QUARANTINE_AT
    strangers_reject_at: float | None = None
    directions: tuple[Direction, ...] = _INBOUND

    @property
    def thresholds(self) -> ModelThresholds:
        return ModelThresholds(self.flag_at, self.quarantine_at, self.reject_at)

    @property
    def stranger_thresholds(self) -> ModelThresholds:
        flag, quarantine = self.flag_at, self.strangers_quarantine_at
        if flag is not None and quarantine is not None and flag > quarantine:
            flag = None  # quarantining already covers every flagged stranger
        return ModelThresholds(flag, quarantine, self.strangers_reject_at)


@dataclass(frozen=True, slots=True)
class ReputationPolicy:
    """How spam reports against a sender count (thresholds in weighted reports; None: off)."""

    points: float = 1.0
    half_life_hours: float = 72.0
    flag_at: float | None = 1.0
    quarantine_at: float | None = 3.0
    directions: tuple[Direction, ...] = (Direction.INBOUND, Direction.OUTBOUND)


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy. Build it with `parse_policy` or `policy_from_dict`.

    A section that is absent is ``None`` (or empty) and adds no rule.

    Attributes:
        version: Document format version.
        local_domains: Normalised local domains, sorted; the edge should build each
            `DecisionContext` with these.
        groups: User groups, sorted by name.
        federation: Federation allow/deny lists.
        decision: Failure action and score thresholds.
        strangers: Stricter treatment of strangers.
        blocklists: Block lists and the actions of block-list hits.
        barriers: Information barriers, sorted by their pair of groups.
        encryption: End-to-end encryption policy.
        limits: Rate and fan-out limits.
        duplicates: Duplicate-body burst detection.
        lexicons: Review lexicons, sorted by name.
        model: Use of the text model (which the edge passes to `build_chain`).
        reputation: Use of the reports against senders (the edge passes the ledger).
    """

    version: int
    local_domains: tuple[str, ...]
    groups: tuple[GroupPolicy, ...] = ()
    federation: FederationPolicy = field(default_factory=FederationPolicy)
    decision: DecisionPolicy = field(default_factory=DecisionPolicy)
    strangers: StrangerPolicy | None = None
    blocklists: BlocklistPolicy | None = None
    barriers: tuple[BarrierPolicy, ...] = ()
    encryption: EncryptionPolicy | None = None
    limits: LimitsPolicy | None = None
    duplicates: DuplicatesPolicy | None = None
    lexicons: tuple[LexiconPolicy, ...] = ()
    model: ModelPolicy | None = None
    reputation: ReputationPolicy | None = None

    def group(self, name: str) -> GroupPolicy | None:
        """The group called ``name``, if defined."""
        return next((g for g in self.groups if g.name == name), None)


# --- validation helpers ---------------------------------------------------------------------


def _describe(value: object) -> str:
    """Name a value's type as TOML does, with a short preview of scalar values."""
    names: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "a boolean"),
        (str, "a string"),
        (int, "an integer"),
        (float, "a float"),
        ((list, tuple), "an array"),
        (Mapping, "a table"),
        ((datetime, date, time), "a date/time"),
    ]
    kind = next((n for t, n in names if isinstance(value, t)), type(value).__name__)
    if not isinstance(value, (bool, str, int, float, datetime, date, time)):
        return kind  # containers and unknown objects: their repr may be huge or hostile
    return f"{kind} ({_preview(value)})"


def _preview(value: object) -> str:
    """A short repr that cannot fail (huge integers refuse str conversion)."""
    if isinstance(value, str):
        value = value[:60]
    try:
        text = repr(value)
    except ValueError:
        return "<too large to show>"
    return text if len(text) <= 60 else text[:57] + "..."


def _sub(path: str, key: str) -> str:
    """Dotted path of ``key`` under ``path``, quoting keys that TOML would need quoted."""
    if len(key) > 60:
        key = key[:57] + "..."
    shown = key if _BARE_KEY.fullmatch(key) else json.dumps(key)
    return f"{path}.{shown}" if path else shown


def _fail(path: str, problem: str) -> PolicyError:
    return PolicyError(f"{path}: {problem}" if path else problem, key=path or None)


def _listing(names: Iterable[str], limit: int = 20) -> str:
    """Comma-separated sorted names, cut after ``limit`` so errors stay readable."""
    items = sorted(names)
    shown = ", ".join(items[:limit])
    return shown + f", ... ({len(items) - limit} more)" if len(items) > limit else shown


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _table(value: object, path: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise _fail(path, f"must be a table, got {_describe(value)}")
    for key in value:
        if not isinstance(key, str):
            raise _fail(path, f"keys must be strings, got {_describe(key)}")
    return value


def _check_keys(table: Mapping[str, object], path: str, known: Iterable[str]) -> None:
    known = tuple(known)
    for key in table:
        if key not in known:
            where = "top-level key" if not path else "key"
            raise PolicyError(
                f"unknown {where} {_sub(path, key)!r}{_suggest(key, known)}; "
                f"known keys{' in ' + path if path else ''}: {_listing(known)}",
                key=_sub(path, key),
            )


def _string(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, f"must be a string, got {_describe(value)}")
    return value


def _string_list(value: object, path: str) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise _fail(path, f"must be an array of strings, got {_describe(value)}")
    if len(value) > MAX_LIST_ENTRIES:
        raise _fail(path, f"has {len(value)} entries; at most {MAX_LIST_ENTRIES} are allowed")
    return [_string(item, f"{path}[{i}]") for i, item in enumerate(value)]


def _choice(value: object, path: str, choices: Iterable[str], note: str = "") -> str:
    choices = tuple(choices)
    text = _string(value, path)
    if text not in choices:
        quoted = [f"'{c}'" for c in choices]
        allowed = " or ".join(quoted) if len(quoted) <= 2 else "one of " + ", ".join(quoted)
        raise _fail(path, f"must be {allowed}, got {_preview(text)}{note}")
    return text


def _number(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(path, f"must be a number, got {_describe(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise _fail(path, "is too large") from None
    if not math.isfinite(number):
        raise _fail(path, f"must be a finite number, got {_preview(value)}")
    return number


def _domain_patterns(value: object, path: str) -> tuple[str, ...]:
    parsed: set[str] = set()
    for i, raw in enumerate(_string_list(value, path)):
        try:
            parsed.add(parse_domain_pattern(raw))
        except RuleError as exc:
            raise _fail(f"{path}[{i}]", str(exc)) from None
    return tuple(sorted(parsed))


def _mode(table: Mapping[str, object], path: str, default: str | None) -> FederationMode:
    if "mode" not in table:
        if default is None:
            raise _fail(_sub(path, "mode"), "is required ('allow' or 'deny')")
        return FederationMode(default)
    return FederationMode(_choice(table["mode"], _sub(path, "mode"), ("allow", "deny")))


# --- sections -------------------------------------------------------------------------------


def _parse_version(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail("version", f"must be an integer, got {_describe(value)}")
    if value not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_VERSIONS))
        raise _fail(
            "version", f"unsupported policy version {_preview(value)}; supported: {supported}"
        )
    return value


def _parse_local_domains(value: object) -> tuple[str, ...]:
    domains = _domain_patterns(value, "local_domains")
    if not domains:
        raise _fail("local_domains", "must list at least one domain")
    for domain in domains:
        if domain.startswith("*"):
            raise _fail("local_domains", f"'{domain}': wildcards are not allowed here")
    return domains


def _parse_groups(value: object, local_domains: tuple[str, ...]) -> tuple[GroupPolicy, ...]:
    table = _table(value, "groups")
    if len(table) > MAX_GROUPS:
        raise _fail("groups", f"has {len(table)} groups; at most {MAX_GROUPS} are allowed")
    local = frozenset(local_domains)
    groups = []
    for name, body in table.items():
        path = _sub("groups", name)
        if not _GROUP_NAME.fullmatch(name):
            raise _fail(path, "group names must be 1-64 letters, digits, '_' or '-'")
        group_table = _table(body, path)
        _check_keys(group_table, path, ("members",))
        members_path = _sub(path, "members")
        if "members" not in group_table:
            raise _fail(members_path, "is required (an array of 'user@domain' or '*@domain')")
        members: set[str] = set()
        for i, raw in enumerate(_string_list(group_table["members"], members_path)):
            try:
                member = parse_member_pattern(raw)
            except RuleError as exc:
                raise _fail(f"{members_path}[{i}]", str(exc)) from None
            domain = member.partition("@")[2]
            if domain not in local:
                raise _fail(
                    f"{members_path}[{i}]",
                    f"{_preview(raw)} is not a local user ({domain} is not in local_domains)",
                )
            members.add(member)
        groups.append(GroupPolicy(name, tuple(sorted(members))))
    return tuple(sorted(groups, key=lambda g: g.name))


def _parse_federation(value: object, groups: tuple[GroupPolicy, ...]) -> FederationPolicy:
    path = "federation"
    table = _table(value, path)
    _check_keys(table, path, ("mode", "domains", "action", "groups"))
    mode = _mode(table, path, default="deny")
    domains = _domain_patterns(table.get("domains", []), _sub(path, "domains"))
    action = Action.REJECT
    if "action" in table:
        action = Action(
            _choice(table["action"], _sub(path, "action"), (a.value for a in _REFUSAL_ACTIONS))
        )
    group_lists = []
    known = {g.name for g in groups}
    groups_path = _sub(path, "groups")
    for name, body in _table(table.get("groups", {}), groups_path).items():
        group_path = _sub(groups_path, name)
        if name not in known:
            defined = _listing(known) if known else "none"
            raise _fail(
                group_path,
                f"no such group{_suggest(name, known)}; defined in [groups]: {defined}",
            )
        group_table = _table(body, group_path)
        _check_keys(group_table, group_path, ("mode", "domains"))
        group_lists.append(
            GroupFederation(
                name,
                _mode(group_table, group_path, default=None),
                _domain_patterns(group_table.get("domains", []), _sub(group_path, "domains")),
            )
        )
    return FederationPolicy(
        mode, domains, action, tuple(sorted(group_lists, key=lambda g: g.group))
    )


def _parse_decision(value: object) -> DecisionPolicy:
    path = "decision"
    table = _table(value, path)
    _check_keys(table, path, ("failure_action", "quarantine_threshold", "reject_threshold"))
    failure = Action.QUARANTINE
    if "failure_action" in table:
        failure = Action(
            _choice(
                table["failure_action"],
                _sub(path, "failure_action"),
                (a.value for a in _REFUSAL_ACTIONS),
                note=" (a failing rule must never let a stanza pass silently)",
            )
        )
    thresholds: dict[str, float | None] = {}
    for key in ("quarantine_threshold", "reject_threshold"):
        thresholds[key] = _number(table[key], _sub(path, key)) if key in table else None
    quarantine, reject = thresholds["quarantine_threshold"], thresholds["reject_threshold"]
    if quarantine is not None and reject is not None and quarantine > reject:
        raise _fail(
            _sub(path, "quarantine_threshold"),
            f"({quarantine:g}) must not exceed reject_threshold ({reject:g})",
        )
    return DecisionPolicy(failure, quarantine, reject)


# --- helpers of the anti-SPIM and compliance sections ---------------------------------------


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"must be true or false, got {_describe(value)}")
    return value


def _integer(value: object, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"must be an integer, got {_describe(value)}")
    if not low <= value <= high:
        raise _fail(path, f"must be between {low} and {high}, got {_preview(value)}")
    return value


def _action(
    table: Mapping[str, object],
    key: str,
    path: str,
    default: Action,
    allowed: Iterable[Action] = _REFUSAL_ACTIONS,
) -> Action:
    if key not in table:
        return default
    return Action(_choice(table[key], _sub(path, key), (a.value for a in allowed)))


def _directions(table: Mapping[str, object], path: str) -> tuple[Direction, ...]:
    if "directions" not in table:
        return _INBOUND
    key = _sub(path, "directions")
    names = _string_list(table["directions"], key)
    if not names:
        raise _fail(key, "must list 'inbound', 'outbound' or both")
    found = {
        Direction(_choice(name, f"{key}[{i}]", ("inbound", "outbound")))
        for i, name in enumerate(names)
    }
    return tuple(sorted(found))


def _array_of_tables(value: object, path: str) -> list[Mapping[str, object]]:
    if not isinstance(value, (list, tuple)):
        raise _fail(path, f"must be an array of tables ([[{path}]]), got {_describe(value)}")
    if len(value) > MAX_GROUPS:
        raise _fail(path, f"has {len(value)} entries; at most {MAX_GROUPS} are allowed")
    return [_table(item, f"{path}[{i}]") for i, item in enumerate(value)]


def _probability(table: Mapping[str, object], key: str, path: str) -> float | None:
    """A probability threshold; ``false`` switches it off (TOML has no null)."""
    where = _sub(path, key)
    value = table[key]
    if value is False:
        return None
    if value is True:
        raise _fail(where, "must be a number in [0, 1], or false to switch it off")
    number = _number(value, where)
    if not 0.0 <= number <= 1.0:
        raise _fail(where, f"must be within [0, 1], got {_preview(value)}")
    return number


def _threshold_not_above(
    value: float | None, limit: float | None, path: str, limit_name: str
) -> None:
    if value is not None and limit is not None and value > limit:
        raise _fail(
            path,
            f"({value:g}) must not exceed {limit_name} ({limit:g}): strangers get stricter "
            "thresholds, never laxer ones",
        )


# --- anti-SPIM and compliance sections ------------------------------------------------------


def _parse_strangers(value: object, decision: DecisionPolicy) -> StrangerPolicy:
    path = "strangers"
    table = _table(value, path)
    keys = ("quarantine_threshold", "reject_threshold", "first_contact_url", "unknown_is_stranger")
    _check_keys(table, path, keys)
    found: dict[str, float | None] = {}
    for key, general in (
        ("quarantine_threshold", decision.quarantine_threshold),
        ("reject_threshold", decision.reject_threshold),
    ):
        found[key] = _number(table[key], _sub(path, key)) if key in table else None
        _threshold_not_above(found[key], general, _sub(path, key), f"decision.{key}")
    quarantine = found["quarantine_threshold"]
    reject = found["reject_threshold"]
    effective_q = quarantine if quarantine is not None else decision.quarantine_threshold
    effective_r = reject if reject is not None else decision.reject_threshold
    if effective_q is not None and effective_r is not None and effective_q > effective_r:
        raise _fail(
            _sub(path, "reject_threshold" if reject is not None else "quarantine_threshold"),
            f"the strangers' quarantine threshold ({effective_q:g}) must not exceed their "
            f"reject threshold ({effective_r:g})",
        )
    unknown = (
        _bool(table["unknown_is_stranger"], _sub(path, "unknown_is_stranger"))
        if "unknown_is_stranger" in table
        else False
    )
    return StrangerPolicy(
        quarantine,
        reject,
        _action(table, "first_contact_url", path, Action.QUARANTINE, _ALL_ACTIONS),
        unknown,
    )


def _action_table(
    value: object, path: str, known: tuple[str, ...] | None
) -> tuple[tuple[str, Action], ...]:
    table = _table(value, path)
    if known is not None:
        _check_keys(table, path, known)
    pairs = []
    for key, raw in table.items():
        if not key or len(key) > 200:
            raise _fail(path, "keys must be 1-200 characters")
        choices = (a.value for a in _REFUSAL_ACTIONS)
        pairs.append((key, Action(_choice(raw, _sub(path, key), choices))))
    return tuple(sorted(pairs))


def _parse_blocklists(value: object) -> BlocklistPolicy:
    path = "blocklists"
    table = _table(value, path)
    kinds = tuple(k.value for k in ListKind)
    _check_keys(
        table,
        path,
        (*kinds, "action", "kind_actions", "source_actions", "directions", "exempt_contacts"),
    )
    lists: dict[str, tuple[str, ...]] = {}
    for kind in kinds:
        key = _sub(path, kind)
        parsed: set[str] = set()
        for i, raw in enumerate(_string_list(table.get(kind, []), key)):
            try:
                parsed.add(parse_entry(kind, raw))
            except RuleError as exc:
                raise _fail(f"{key}[{i}]", str(exc)) from None
        lists[kind] = tuple(sorted(parsed))
    kind_actions = _action_table(table.get("kind_actions", {}), _sub(path, "kind_actions"), kinds)
    source_actions = _action_table(
        table.get("source_actions", {}), _sub(path, "source_actions"), None
    )
    exempt = (
        _bool(table["exempt_contacts"], _sub(path, "exempt_contacts"))
        if "exempt_contacts" in table
        else True
    )
    return BlocklistPolicy(
        lists["domains"],
        lists["jids"],
        lists["jid_sha256"],
        lists["url_hosts"],
        _action(table, "action", path, Action.REJECT),
        tuple((ListKind(k), a) for k, a in kind_actions),
        source_actions,
        _directions(table, path),
        exempt,
    )


def _parse_barriers(value: object, groups: tuple[GroupPolicy, ...]) -> tuple[BarrierPolicy, ...]:
    known = {g.name for g in groups}
    barriers: dict[tuple[str, str], BarrierPolicy] = {}
    for i, table in enumerate(_array_of_tables(value, "barriers")):
        path = f"barriers[{i}]"
        _check_keys(table, path, ("between", "reason", "action"))
        key = _sub(path, "between")
        if "between" not in table:
            raise _fail(key, "is required (the names of two groups from [groups])")
        names = _string_list(table["between"], key)
        if len(names) != 2:
            raise _fail(key, f"must name exactly two groups, got {len(names)}")
        for j, name in enumerate(names):
            if name not in known:
                defined = _listing(known) if known else "none"
                raise _fail(
                    f"{key}[{j}]",
                    f"no such group {_preview(name)}{_suggest(name, known)}; "
                    f"defined in [groups]: {defined}",
                )
        if names[0] == names[1]:
            raise _fail(key, f"must name two different groups, got {names[0]!r} twice")
        first, second = sorted(names)
        if (first, second) in barriers:
            raise _fail(key, f"a barrier between {first} and {second} is already defined")
        reason = None
        if "reason" in table:
            reason = _string(table["reason"], _sub(path, "reason")).strip()
            if not reason or len(reason) > MAX_REASON_CHARS:
                raise _fail(_sub(path, "reason"), f"must be 1-{MAX_REASON_CHARS} characters")
        barriers[(first, second)] = BarrierPolicy(
            (first, second), reason, _action(table, "action", path, Action.REJECT)
        )
    return tuple(barriers[k] for k in sorted(barriers))


def _parse_encryption(value: object) -> EncryptionPolicy:
    path = "encryption"
    table = _table(value, path)
    methods = (*KNOWN_METHODS, OTHER)
    _check_keys(table, path, methods)
    actions = {m: _action(table, m, path, Action.ALLOW, _ALL_ACTIONS) for m in methods}
    return EncryptionPolicy(**actions)


def _parse_limits(value: object) -> LimitsPolicy:
    path = "limits"
    table = _table(value, path)
    numbers = ("per_sender_per_minute", "new_recipients_per_minute", "per_domain_per_minute")
    _check_keys(table, path, (*numbers, "action", "directions", "exempt_contacts"))
    defaults = LimitsPolicy()
    limits = {
        key: _integer(table[key], _sub(path, key), 0, MAX_LIMIT)
        if key in table
        else getattr(defaults, key)
        for key in numbers
    }
    exempt = (
        _bool(table["exempt_contacts"], _sub(path, "exempt_contacts"))
        if "exempt_contacts" in table
        else True
    )
    return LimitsPolicy(
        **limits,
        action=_action(table, "action", path, Action.QUARANTINE),
        directions=_directions(table, path),
        exempt_contacts=exempt,
    )


def _parse_duplicates(value: object) -> DuplicatesPolicy:
    path = "duplicates"
    table = _table(value, path)
    _check_keys(
        table,
        path,
        ("recipients", "window_seconds", "action", "directions", "exempt_contacts"),
    )
    recipients = (
        _integer(table["recipients"], _sub(path, "recipients"), 2, MAX_LIMIT)
        if "recipients" in table
        else DuplicatesPolicy().recipients
    )
    window = DuplicatesPolicy().window_seconds
    if "window_seconds" in table:
        key = _sub(path, "window_seconds")
        window = _number(table["window_seconds"], key)
        if not 0 < window <= MAX_WINDOW_SECONDS:
            raise _fail(key, f"must be above 0 and at most {MAX_WINDOW_SECONDS:g} (a week)")
    exempt = (
        _bool(table["exempt_contacts"], _sub(path, "exempt_contacts"))
        if "exempt_contacts" in table
        else True
    )
    return DuplicatesPolicy(
        recipients,
        window,
        _action(table, "action", path, Action.QUARANTINE),
        _directions(table, path),
        exempt,
    )


def _parse_lexicons(value: object) -> tuple[LexiconPolicy, ...]:
    lexicons: dict[str, LexiconPolicy] = {}
    for i, table in enumerate(_array_of_tables(value, "lexicons")):
        path = f"lexicons[{i}]"
        _check_keys(table, path, ("name", "terms", "action"))
        if "name" not in table:
            raise _fail(_sub(path, "name"), "is required")
        name = _string(table["name"], _sub(path, "name"))
        if not _GROUP_NAME.fullmatch(name):
            raise _fail(
                _sub(path, "name"), "lexicon names must be 1-64 letters, digits, '_' or '-'"
            )
        if name in lexicons:
            raise _fail(_sub(path, "name"), f"a lexicon named {name!r} is already defined")
        if "action" in table:
            _choice(
                table["action"],
                _sub(path, "action"),
                (Action.FLAG.value,),
                note=" (lexicons only flag messages for review; they never block)",
            )
        key = _sub(path, "terms")
        if "terms" not in table:
            raise _fail(key, "is required (an array of words or phrases)")
        terms = _string_list(table["terms"], key)
        if not terms:
            raise _fail(key, "must list at least one term")
        for j, term in enumerate(terms):
            try:
                Lexicon.of(name, [term])
            except RuleError as exc:
                raise _fail(f"{key}[{j}]", str(exc)) from None
        lexicons[name] = LexiconPolicy(name, tuple(sorted(set(terms))))
    return tuple(lexicons[k] for k in sorted(lexicons))


def _parse_model(value: object) -> ModelPolicy:
    path = "model"
    table = _table(value, path)
    general = ("flag_at", "quarantine_at", "reject_at")
    strangers = ("strangers_quarantine_at", "strangers_reject_at")
    _check_keys(table, path, ("weight", *general, *strangers, "directions"))
    defaults = ModelPolicy()
    weight = defaults.weight
    if "weight" in table:
        weight = _number(table["weight"], _sub(path, "weight"))
        if abs(weight) > MAX_MODEL_WEIGHT:
            raise _fail(_sub(path, "weight"), f"must be within ±{MAX_MODEL_WEIGHT:g}")
    found: dict[str, float | None] = {
        key: _probability(table, key, path) if key in table else getattr(defaults, key)
        for key in general
    }
    previous: tuple[str, float] | None = None
    for key in general:
        current = found[key]
        if current is None:
            continue
        if previous is not None and current < previous[1]:
            raise _fail(
                _sub(path, key),
                f"({current:g}) must not be below {previous[0]} ({previous[1]:g})",
            )
        previous = (key, current)
    quarantine, reject = found["quarantine_at"], found["reject_at"]
    # Strangers' thresholds: never laxer than everyone's. Left out, the strangers'
    # quarantine threshold is 0.7 (or quarantine_at if lower), their reject threshold
    # reject_at.
    if "strangers_quarantine_at" in table:
        s_quarantine = _probability(table, "strangers_quarantine_at", path)
        if s_quarantine is None and quarantine is not None:
            raise _fail(
                _sub(path, "strangers_quarantine_at"),
                "cannot be switched off while quarantine_at is on (strangers get stricter "
                "thresholds, never laxer ones)",
            )
        _threshold_not_above(
            s_quarantine, quarantine, _sub(path, "strangers_quarantine_at"), "quarantine_at"
        )
    else:
        s_quarantine = DEFAULT_STRANGERS_QUARANTINE_AT
        if quarantine is not None:
            s_quarantine = min(s_quarantine, quarantine)
    s_reject = reject
    if "strangers_reject_at" in table:
        s_reject = _probability(table, "strangers_reject_at", path)
        if s_reject is None and reject is not None:
            raise _fail(
                _sub(path, "strangers_reject_at"),
                "cannot be switched off while reject_at is on (strangers get stricter "
                "thresholds, never laxer ones)",
            )
        _threshold_not_above(s_reject, reject, _sub(path, "strangers_reject_at"), "reject_at")
    if s_reject is not None and s_quarantine is not None and s_reject < s_quarantine:
        key = "strangers_reject_at" if "strangers_reject_at" in table else "strangers_quarantine_at"
        raise _fail(
            _sub(path, key),
            f"the strangers' reject threshold ({s_reject:g}) must not be below their "
            f"quarantine threshold ({s_quarantine:g})",
        )
    return ModelPolicy(
        weight,
        found["flag_at"],
        quarantine,
        reject,
        s_quarantine,
        s_reject,
        _directions(table, path),
    )


def _parse_reputation(value: object) -> ReputationPolicy:
    path = "reputation"
    table = _table(value, path)
    _check_keys(
        table, path, ("points", "half_life_hours", "flag_at", "quarantine_at", "directions")
    )
    defaults = ReputationPolicy()
    points = defaults.points
    if "points" in table:
        points = _number(table["points"], _sub(path, "points"))
        if abs(points) > MAX_MODEL_WEIGHT:
            raise _fail(_sub(path, "points"), f"must be within ±{MAX_MODEL_WEIGHT:g}")
    half_life = defaults.half_life_hours
    if "half_life_hours" in table:
        half_life = _number(table["half_life_hours"], _sub(path, "half_life_hours"))
        if not 0.0 < half_life <= MAX_HALF_LIFE_HOURS:
            raise _fail(
                _sub(path, "half_life_hours"),
                f"must be above 0 and at most {MAX_HALF_LIFE_HOURS:g}, got {_preview(half_life)}",
            )
    found: dict[str, float | None] = {}
    for key in ("flag_at", "quarantine_at"):
        if key not in table:
            found[key] = getattr(defaults, key)
            continue
        raw = table[key]
        if raw is False:
            found[key] = None
            continue
        if raw is True:
            raise _fail(_sub(path, key), "must be a positive number, or false to switch it off")
        number = _number(raw, _sub(path, key))
        if number <= 0.0:
            raise _fail(_sub(path, key), f"must be above 0, got {_preview(raw)}")
        found[key] = number
    flag, quarantine = found["flag_at"], found["quarantine_at"]
    if flag is not None and quarantine is not None and flag > quarantine:
        raise _fail(
            _sub(path, "flag_at"), f"({flag:g}) must not exceed quarantine_at ({quarantine:g})"
        )
    directions = defaults.directions
    if "directions" in table:
        directions = _directions(table, path)
    return ReputationPolicy(points, half_life, flag, quarantine, directions)


# The known top-level keys; a new section adds its name here and a parser below.
_TOP_LEVEL_KEYS = (
    "version",
    "local_domains",
    "groups",
    "federation",
    "decision",
    "strangers",
    "blocklists",
    "barriers",
    "encryption",
    "limits",
    "duplicates",
    "lexicons",
    "model",
    "reputation",
)


# --- public API -----------------------------------------------------------------------------


def policy_from_dict(data: Mapping[str, object]) -> Policy:
    """Validate a policy given as nested dicts and lists (the shape TOML produces).

    Raises:
        PolicyError: naming the first offending key.
    """
    table = _table(data, "")
    if not table:
        raise PolicyError("the policy is empty; it needs at least 'version' and 'local_domains'")
    # The version first: a document of another format version gets that error, not a
    # confusing one about keys this version does not know.
    if "version" not in table:
        raise _fail("version", f"is required (the current format version is {CURRENT_VERSION})")
    version = _parse_version(table["version"])
    _check_keys(table, "", _TOP_LEVEL_KEYS)
    if "local_domains" not in table:
        raise _fail("local_domains", "is required (the domains this deployment serves)")
    local_domains = _parse_local_domains(table["local_domains"])
    groups = _parse_groups(table.get("groups", {}), local_domains)
    federation = (
        _parse_federation(table["federation"], groups)
        if "federation" in table
        else FederationPolicy()
    )
    decision = _parse_decision(table["decision"]) if "decision" in table else DecisionPolicy()
    return Policy(
        version,
        local_domains,
        groups,
        federation,
        decision,
        strangers=(
            _parse_strangers(table["strangers"], decision) if "strangers" in table else None
        ),
        blocklists=_parse_blocklists(table["blocklists"]) if "blocklists" in table else None,
        barriers=_parse_barriers(table.get("barriers", []), groups),
        encryption=_parse_encryption(table["encryption"]) if "encryption" in table else None,
        limits=_parse_limits(table["limits"]) if "limits" in table else None,
        duplicates=_parse_duplicates(table["duplicates"]) if "duplicates" in table else None,
        lexicons=_parse_lexicons(table.get("lexicons", [])),
        model=_parse_model(table["model"]) if "model" in table else None,
        reputation=_parse_reputation(table["reputation"]) if "reputation" in table else None,
    )


def parse_policy(text: str | bytes) -> Policy:
    """Parse and validate a policy from TOML text (bytes must be UTF-8).

    Raises:
        PolicyError: if the text is not TOML or the policy is not valid.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError(f"the policy is not UTF-8: {exc}") from None
    if len(text) > MAX_POLICY_CHARS:
        raise PolicyError(f"the policy is larger than {MAX_POLICY_CHARS} characters")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"the policy is not valid TOML: {exc}") from None
    except (ValueError, RecursionError) as exc:
        # tomllib can also fail this way on hostile input (absurdly long integers, deep
        # nesting); either way the document is unusable.
        raise PolicyError(f"the policy could not be read: {type(exc).__name__}") from None
    return policy_from_dict(data)


def policy_to_dict(policy: Policy) -> dict[str, Any]:
    """The canonical form of a policy: TOML-shaped, every list sorted, defaults explicit.

    ``policy_from_dict(policy_to_dict(p)) == p`` for every valid policy.
    """
    federation: dict[str, Any] = {
        "mode": policy.federation.mode.value,
        "domains": list(policy.federation.domains),
        "action": policy.federation.action.value,
        "groups": {
            g.group: {"mode": g.mode.value, "domains": list(g.domains)}
            for g in policy.federation.groups
        },
    }
    decision: dict[str, Any] = {"failure_action": policy.decision.failure_action.value}
    # TOML has no null: an unset threshold is an absent key.
    if policy.decision.quarantine_threshold is not None:
        decision["quarantine_threshold"] = policy.decision.quarantine_threshold
    if policy.decision.reject_threshold is not None:
        decision["reject_threshold"] = policy.decision.reject_threshold
    data: dict[str, Any] = {
        "version": policy.version,
        "local_domains": list(policy.local_domains),
        "groups": {g.name: {"members": list(g.members)} for g in policy.groups},
        "federation": federation,
        "decision": decision,
    }
    # Sections that are absent stay absent, so the fingerprints of policies written before
    # a section existed do not change.
    if policy.strangers is not None:
        data["strangers"] = _strangers_to_dict(policy.strangers)
    if policy.blocklists is not None:
        data["blocklists"] = _blocklists_to_dict(policy.blocklists)
    if policy.barriers:
        data["barriers"] = [_barrier_to_dict(b) for b in policy.barriers]
    if policy.encryption is not None:
        e = policy.encryption
        data["encryption"] = {
            "omemo": e.omemo.value,
            "openpgp": e.openpgp.value,
            "otr": e.otr.value,
            "other": e.other.value,
        }
    if policy.limits is not None:
        limits = policy.limits
        data["limits"] = {
            "per_sender_per_minute": limits.per_sender_per_minute,
            "new_recipients_per_minute": limits.new_recipients_per_minute,
            "per_domain_per_minute": limits.per_domain_per_minute,
            "action": limits.action.value,
            "directions": [d.value for d in limits.directions],
            "exempt_contacts": limits.exempt_contacts,
        }
    if policy.duplicates is not None:
        dup = policy.duplicates
        data["duplicates"] = {
            "recipients": dup.recipients,
            "window_seconds": dup.window_seconds,
            "action": dup.action.value,
            "directions": [d.value for d in dup.directions],
            "exempt_contacts": dup.exempt_contacts,
        }
    if policy.lexicons:
        data["lexicons"] = [
            {"name": lex.name, "terms": list(lex.terms), "action": Action.FLAG.value}
            for lex in policy.lexicons
        ]
    if policy.model is not None:
        data["model"] = _model_to_dict(policy.model)
    if policy.reputation is not None:
        r = policy.reputation
        data["reputation"] = {
            "points": r.points,
            "half_life_hours": r.half_life_hours,
            "flag_at": False if r.flag_at is None else r.flag_at,
            "quarantine_at": False if r.quarantine_at is None else r.quarantine_at,
            "directions": [d.value for d in r.directions],
        }
    return data


def _strangers_to_dict(strangers: StrangerPolicy) -> dict[str, Any]:
    data: dict[str, Any] = {
        "first_contact_url": strangers.first_contact_url.value,
        "unknown_is_stranger": strangers.unknown_is_stranger,
    }
    if strangers.quarantine_threshold is not None:
        data["quarantine_threshold"] = strangers.quarantine_threshold
    if strangers.reject_threshold is not None:
        data["reject_threshold"] = strangers.reject_threshold
    return data


def _blocklists_to_dict(lists: BlocklistPolicy) -> dict[str, Any]:
    return {
        "domains": list(lists.domains),
        "jids": list(lists.jids),
        "jid_sha256": list(lists.jid_sha256),
        "url_hosts": list(lists.url_hosts),
        "action": lists.action.value,
        "kind_actions": {k.value: a.value for k, a in lists.kind_actions},
        "source_actions": {s: a.value for s, a in lists.source_actions},
        "directions": [d.value for d in lists.directions],
        "exempt_contacts": lists.exempt_contacts,
    }


def _barrier_to_dict(barrier: BarrierPolicy) -> dict[str, Any]:
    data: dict[str, Any] = {"between": list(barrier.between), "action": barrier.action.value}
    if barrier.reason is not None:
        data["reason"] = barrier.reason
    return data


def _model_to_dict(model: ModelPolicy) -> dict[str, Any]:
    def probability(value: float | None) -> float | bool:
        return False if value is None else value

    return {
        "weight": model.weight,
        "flag_at": probability(model.flag_at),
        "quarantine_at": probability(model.quarantine_at),
        "reject_at": probability(model.reject_at),
        "strangers_quarantine_at": probability(model.strangers_quarantine_at),
        "strangers_reject_at": probability(model.strangers_reject_at),
        "directions": [d.value for d in model.directions],
    }


def policy_fingerprint(policy: Policy) -> str:
    """SHA-256 (hex) of the canonical JSON form: equal for equivalent documents.

    Whitespace, comments, key order, list order, duplicates and the spelling of domains
    (case, Unicode vs. A-label) do not change it; any change in meaning does.
    """
    canonical = json.dumps(
        policy_to_dict(policy), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def build_chain(
    policy: Policy,
    *,
    metrics: RuleMetrics | None = None,
    model: TextScorer | None = None,
    trust: TrustStore | None = None,
    counters: CounterStore | None = None,
    blocklists: BlockList | None = None,
    reputation: ReputationLedger | None = None,
) -> RuleChain:
    """Turn a policy into the rule chain that enforces it.

    The rules run cheapest first (DESIGN.md, Verdicts): stranger test, block lists,
    federation, information barriers, encryption, rate and fan-out limits, duplicate
    bodies, the sender's reputation (reports), lexicons, the text model; then the score
    thresholds (the strangers' own for strangers). A section that is absent adds no rule.

    The stateful parts belong to the edge and outlive reloads, so it passes them in (and
    `PolicyHolder` keeps passing the same ones):

    Args:
        policy: A validated policy.
        metrics: Counters to keep using (pass the previous chain's on reload).
        model: The text model; without one there is no model rule, whatever ``[model]``
            says. With one and no ``[model]`` section, the section's defaults apply.
        trust: Learned rosters and correspondents; without it only
            ``DecisionContext.sender_in_recipient_roster`` tells strangers apart.
        counters: Where rate limits and duplicate ledgers count; a fresh in-memory store
            if omitted (then counts restart with every chain built).
        blocklists: The live block list (RTBLs, list files), consulted besides the
            policy's own entries; the block-list rule exists if this is given or the policy
            has a ``[blocklists]`` section.
        reputation: Reports against senders; the reputation rule exists if this is given
            (with the defaults of ``[reputation]`` when the policy has no such section).

    Raises:
        RuleError: if a rule refuses its configuration (a validated policy never causes
            this).
    """
    strangers = policy.strangers
    resolver = TrustResolver(
        trust, unknown_is_stranger=strangers is not None and strangers.unknown_is_stranger
    )
    rules: list[Rule] = []
    if strangers is not None:
        rules.append(StrangerRule(resolver, url_action=strangers.first_contact_url))
    lists = policy.blocklists
    if lists is not None or blocklists is not None:
        settings = lists or BlocklistPolicy()
        consulted = [
            BlockList.of(
                source=POLICY_SOURCE,
                domains=settings.domains,
                jids=settings.jids,
                jid_sha256=settings.jid_sha256,
                url_hosts=settings.url_hosts,
            )
        ]
        if blocklists is not None:
            consulted.append(blocklists)
        rules.append(
            BlocklistRule(
                consulted,
                action=settings.action,
                kind_actions=dict(settings.kind_actions),
                source_actions=dict(settings.source_actions),
                directions=settings.directions,
                trust=resolver,
                exempt_contacts=settings.exempt_contacts,
            )
        )
    members = {g.name: g.members for g in policy.groups}
    federation = policy.federation
    rules.append(
        FederationRule(
            DomainList.of(federation.mode, federation.domains),
            groups=[
                (UserGroup.of(g.group, members[g.group]), DomainList.of(g.mode, g.domains))
                for g in federation.groups
            ],
            action=federation.action,
        )
    )
    if policy.barriers:
        rules.append(
            BarrierRule(
                [
                    Barrier(
                        UserGroup.of(b.between[0], members[b.between[0]]),
                        UserGroup.of(b.between[1], members[b.between[1]]),
                        b.reason,
                        b.action,
                    )
                    for b in policy.barriers
                ]
            )
        )
    if policy.encryption is not None:
        e = policy.encryption
        rules.append(
            EncryptionRule({"omemo": e.omemo, "openpgp": e.openpgp, "otr": e.otr}, other=e.other)
        )
    if (policy.limits is not None or policy.duplicates is not None) and counters is None:
        counters = InMemoryCounterStore()
    if policy.limits is not None:
        assert counters is not None
        limits = policy.limits
        for kind, limit in (
            (LimitKind.SENDER, limits.per_sender_per_minute),
            (LimitKind.NEW_RECIPIENTS, limits.new_recipients_per_minute),
            (LimitKind.DOMAIN, limits.per_domain_per_minute),
        ):
            if limit > 0:
                rules.append(
                    RateLimitRule(
                        kind,
                        limit,
                        counters,
                        action=limits.action,
                        directions=limits.directions,
                        trust=resolver,
                        exempt_contacts=limits.exempt_contacts,
                    )
                )
    if policy.duplicates is not None:
        assert counters is not None
        dup = policy.duplicates
        rules.append(
            DuplicateRule(
                counters,
                recipients=dup.recipients,
                window=dup.window_seconds,
                action=dup.action,
                directions=dup.directions,
                trust=resolver,
                exempt_contacts=dup.exempt_contacts,
            )
        )
    if reputation is not None:
        rep = policy.reputation or ReputationPolicy()
        rules.append(
            ReputationRule(
                reputation,
                points=rep.points,
                half_life=timedelta(hours=rep.half_life_hours),
                flag_at=rep.flag_at,
                quarantine_at=rep.quarantine_at,
                directions=rep.directions,
            )
        )
    rules.extend(LexiconRule(Lexicon.of(lex.name, lex.terms)) for lex in policy.lexicons)
    if model is not None:
        model_policy = policy.model or ModelPolicy()
        rules.append(
            ModelRule(
                model,
                weight=model_policy.weight,
                thresholds=model_policy.thresholds,
                stranger_thresholds=model_policy.stranger_thresholds,
                trust=resolver,
                directions=model_policy.directions,
            )
        )
    decision = policy.decision
    stranger_thresholds = None
    if strangers is not None:
        stranger_thresholds = Thresholds(
            _first(strangers.quarantine_threshold, decision.quarantine_threshold),
            _first(strangers.reject_threshold, decision.reject_threshold),
        )
    return RuleChain(
        rules,
        failure_action=decision.failure_action,
        thresholds=Thresholds(decision.quarantine_threshold, decision.reject_threshold),
        metrics=metrics,
        policy_fingerprint=policy_fingerprint(policy),
        stranger_thresholds=stranger_thresholds,
        is_stranger=resolver.is_stranger if strangers is not None else None,
    )


def _first(value: float | None, fallback: float | None) -> float | None:
    return fallback if value is None else value


@dataclass(frozen=True, slots=True)
class ActivePolicy:
    """A policy together with its fingerprint and the chain built from it."""

    policy: Policy
    fingerprint: str
    chain: RuleChain


class PolicyHolder:
    """The current policy, swappable at run time without a lock on the hot path.

    Each evaluation reads the current `ActivePolicy` once, so a stanza is judged entirely by
    one policy even if a reload happens meanwhile. The stateful parts (metrics, counters,
    trust store, live block list, model) are kept across reloads and passed to every chain
    built, so counters and learned state survive reloads. A policy that fails to parse
    never replaces the current one.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        metrics: RuleMetrics | None = None,
        model: TextScorer | None = None,
        trust: TrustStore | None = None,
        counters: CounterStore | None = None,
        blocklists: BlockList | None = None,
        reputation: ReputationLedger | None = None,
    ) -> None:
        """Create the holder; see `build_chain` for the stateful parts.

        ``counters`` defaults to one `InMemoryCounterStore` kept for the holder's life.
        """
        self._metrics = metrics if metrics is not None else RuleMetrics()
        self._model = model
        self._trust = trust
        self._counters = counters if counters is not None else InMemoryCounterStore()
        self._blocklists = blocklists
        self._reputation = reputation
        self._swap_lock = threading.Lock()
        self._active = self._activate(policy)

    def _activate(self, policy: Policy) -> ActivePolicy:
        chain = build_chain(
            policy,
            metrics=self._metrics,
            model=self._model,
            trust=self._trust,
            counters=self._counters,
            blocklists=self._blocklists,
            reputation=self._reputation,
        )
        fingerprint = chain.policy_fingerprint
        assert fingerprint is not None  # build_chain always stamps one
        return ActivePolicy(policy, fingerprint, chain)

    @property
    def current(self) -> ActivePolicy:
        return self._active

    @property
    def metrics(self) -> RuleMetrics:
        return self._metrics

    @property
    def counters(self) -> CounterStore:
        return self._counters

    @property
    def trust(self) -> TrustStore | None:
        return self._trust

    @property
    def blocklists(self) -> BlockList | None:
        return self._blocklists

    @property
    def model(self) -> TextScorer | None:
        return self._model

    @property
    def reputation(self) -> ReputationLedger | None:
        return self._reputation

    def replace(self, policy: Policy) -> ActivePolicy:
        """Make ``policy`` current; return the one it replaced."""
        active = self._activate(policy)
        with self._swap_lock:
            previous, self._active = self._active, active
        return previous

    def replace_text(self, text: str | bytes) -> ActivePolicy:
        """Parse ``text`` and make it current; return the one it replaced.

        Raises:
            PolicyError: if the text is not a valid policy (the current one stays).
        """
        return self.replace(parse_policy(text))

    def replace_model(self, model: TextScorer | None) -> ActivePolicy:
        """Use ``model`` (a retrained one, or none) from now on, with the current policy;
        return the `ActivePolicy` it replaced."""
        with self._swap_lock:
            self._model = model
            policy = self._active.policy
        return self.replace(policy)

    def evaluate(self, ctx: DecisionContext) -> Verdict:
        """Judge one stanza with the current policy."""
        return self._active.chain.evaluate(ctx)
