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

To add a section later (information barriers, e2ee, lexicons, stranger thresholds, rate
limits): add a frozen dataclass, a ``_parse_<section>`` function, its key in
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
from datetime import date, datetime, time
from typing import Any

from classifier.chain import RuleChain, RuleMetrics, Thresholds
from classifier.context import DecisionContext
from classifier.errors import PolicyError, RuleError
from classifier.patterns import UserGroup, parse_domain_pattern, parse_member_pattern
from classifier.rules import DomainList, FederationMode, FederationRule
from classifier.verdict import Action, Verdict

CURRENT_VERSION = 1
SUPPORTED_VERSIONS = frozenset({CURRENT_VERSION})
MAX_POLICY_CHARS = 16 * 1024 * 1024
MAX_LIST_ENTRIES = 100_000
MAX_GROUPS = 10_000
_GROUP_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_REFUSAL_ACTIONS = (Action.FLAG, Action.QUARANTINE, Action.REJECT, Action.DROP)


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
class Policy:
    """A validated policy. Build it with `parse_policy` or `policy_from_dict`.

    Attributes:
        version: Document format version.
        local_domains: Normalised local domains, sorted; the edge should build each
            `DecisionContext` with these.
        groups: User groups, sorted by name.
        federation: Federation allow/deny lists.
        decision: Failure action and score thresholds.
    """

    version: int
    local_domains: tuple[str, ...]
    groups: tuple[GroupPolicy, ...] = ()
    federation: FederationPolicy = field(default_factory=FederationPolicy)
    decision: DecisionPolicy = field(default_factory=DecisionPolicy)

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
        allowed = " or ".join(quoted) if len(quoted) == 2 else "one of " + ", ".join(quoted)
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


# The known top-level keys; a new section adds its name here and a parser below.
_TOP_LEVEL_KEYS = ("version", "local_domains", "groups", "federation", "decision")


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
    return Policy(version, local_domains, groups, federation, decision)


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
    return {
        "version": policy.version,
        "local_domains": list(policy.local_domains),
        "groups": {g.name: {"members": list(g.members)} for g in policy.groups},
        "federation": federation,
        "decision": decision,
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


def build_chain(policy: Policy, *, metrics: RuleMetrics | None = None) -> RuleChain:
    """Turn a policy into the rule chain that enforces it.

    Args:
        policy: A validated policy.
        metrics: Counters to keep using (pass the previous chain's on reload).
    """
    members = {g.name: g.members for g in policy.groups}
    federation = policy.federation
    rule = FederationRule(
        DomainList.of(federation.mode, federation.domains),
        groups=[
            (UserGroup.of(g.group, members[g.group]), DomainList.of(g.mode, g.domains))
            for g in federation.groups
        ],
        action=federation.action,
    )
    decision = policy.decision
    return RuleChain(
        [rule],
        failure_action=decision.failure_action,
        thresholds=Thresholds(decision.quarantine_threshold, decision.reject_threshold),
        metrics=metrics,
        policy_fingerprint=policy_fingerprint(policy),
    )


@dataclass(frozen=True, slots=True)
class ActivePolicy:
    """A policy together with its fingerprint and the chain built from it."""

    policy: Policy
    fingerprint: str
    chain: RuleChain


class PolicyHolder:
    """The current policy, swappable at run time without a lock on the hot path.

    Each evaluation reads the current `ActivePolicy` once, so a stanza is judged entirely by
    one policy even if a reload happens meanwhile. All chains share one `RuleMetrics`, so
    counters survive reloads. A policy that fails to parse never replaces the current one.
    """

    def __init__(self, policy: Policy, *, metrics: RuleMetrics | None = None) -> None:
        self._metrics = metrics if metrics is not None else RuleMetrics()
        self._swap_lock = threading.Lock()
        self._active = self._activate(policy)

    def _activate(self, policy: Policy) -> ActivePolicy:
        chain = build_chain(policy, metrics=self._metrics)
        fingerprint = chain.policy_fingerprint
        assert fingerprint is not None  # build_chain always stamps one
        return ActivePolicy(policy, fingerprint, chain)

    @property
    def current(self) -> ActivePolicy:
        return self._active

    @property
    def metrics(self) -> RuleMetrics:
        return self._metrics

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

    def evaluate(self, ctx: DecisionContext) -> Verdict:
        """Judge one stanza with the current policy."""
        return self._active.chain.evaluate(ctx)
