from __future__ import annotations

import contextlib
import textwrap
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from classifier.chain import RuleMetrics
from classifier.context import Direction
from classifier.errors import ClassifierError, PolicyError
from classifier.policy import (
    MAX_LIST_ENTRIES,
    DecisionPolicy,
    FederationPolicy,
    GroupFederation,
    GroupPolicy,
    Policy,
    PolicyHolder,
    build_chain,
    parse_policy,
    policy_fingerprint,
    policy_from_dict,
    policy_to_dict,
)
from classifier.rules import FederationMode
from classifier.verdict import Action
from tests.classifier.helpers import make_ctx
from tests.support.native import module_docstring

EXAMPLE = textwrap.dedent(
    """
    version = 1
    local_domains = ["corp.example", "traders.corp.example", "conference.corp.example"]

    [groups.traders]
    members = ["*@traders.corp.example", "alice@corp.example"]

    [federation]
    mode = "deny"
    domains = ["spam.example", "*.spam.example"]

    [federation.groups.traders]
    mode = "allow"
    domains = ["partner.example", "*.partner.example"]

    [decision]
    failure_action = "quarantine"
    quarantine_threshold = 5
    reject_threshold = 10.0
    """
)

HEAD = 'version = 1\nlocal_domains = ["corp.example"]\n'


def test_example_policy() -> None:
    policy = parse_policy(EXAMPLE)
    assert policy == Policy(
        version=1,
        local_domains=("conference.corp.example", "corp.example", "traders.corp.example"),
        groups=(GroupPolicy("traders", ("*@traders.corp.example", "alice@corp.example")),),
        federation=FederationPolicy(
            FederationMode.DENY,
            ("*.spam.example", "spam.example"),
            Action.REJECT,
            (
                GroupFederation(
                    "traders", FederationMode.ALLOW, ("*.partner.example", "partner.example")
                ),
            ),
        ),
        decision=DecisionPolicy(Action.QUARANTINE, 5.0, 10.0),
    )
    assert policy.group("traders") is policy.groups[0]
    assert policy.group("nobody") is None


def test_module_docstring_example_is_valid() -> None:
    doc = module_docstring("classifier.policy")
    example = textwrap.dedent(doc.split("::", 1)[1].split("``version``", 1)[0])
    assert parse_policy(example).groups[0].name == "traders"


def test_minimal_policy_has_open_federation_and_quarantine_on_failure() -> None:
    policy = parse_policy(HEAD)
    assert policy.federation == FederationPolicy()
    assert policy.federation.mode is FederationMode.DENY
    assert policy.federation.domains == ()
    assert policy.decision == DecisionPolicy(Action.QUARANTINE, None, None)
    assert build_chain(policy).evaluate(make_ctx()).action is Action.ALLOW


def test_bytes_input() -> None:
    assert parse_policy(EXAMPLE.encode()) == parse_policy(EXAMPLE)
    with pytest.raises(PolicyError, match="not UTF-8"):
        parse_policy(b"\xff\xfe")


def test_federation_action_option() -> None:
    policy = parse_policy(HEAD + '[federation]\ndomains = ["x.example"]\naction = "flag"\n')
    assert policy.federation.action is Action.FLAG
    verdict = build_chain(policy).evaluate(make_ctx(sender="a@x.example"))
    assert verdict.action is Action.FLAG


# --- errors -------------------------------------------------------------------------------

ERRORS: list[tuple[str, str | None, str]] = [
    # (document, key, message fragment)
    ("", None, "the policy is empty"),
    ("# only a comment\n\n", None, "the policy is empty"),
    ("version = ", None, "not valid TOML"),
    ("[federation]\nmode='deny'\n", "version", "version: is required"),
    ('version = "1"', "version", "version: must be an integer, got a string ('1')"),
    ("version = true", "version", "must be an integer, got a boolean"),
    ("version = 2\nfuture = 1", "version", "unsupported policy version 2; supported: 1"),
    ("version = 1", "local_domains", "local_domains: is required"),
    ("version = 1\nlocal_domains = []", "local_domains", "at least one domain"),
    ('version = 1\nlocal_domains = "corp.example"', "local_domains", "must be an array"),
    ("version = 1\nlocal_domains = [1]", "local_domains[0]", "must be a string, got an integer"),
    ('version = 1\nlocal_domains = ["*.corp.example"]', "local_domains", "wildcards"),
    (
        HEAD + "[federaton]\nmode = 'deny'",
        "federaton",
        "unknown top-level key 'federaton' (did you mean 'federation'?); known keys: "
        "barriers, blocklists, decision, duplicates, encryption, federation, groups, "
        "lexicons, limits, local_domains, model, reputation, strangers, version",
    ),
    (HEAD + "rate_limits = {}", "rate_limits", "unknown top-level key 'rate_limits'"),
    (
        HEAD + "[federation]\nmode = 'maybe'",
        "federation.mode",
        "federation.mode: must be 'allow' or 'deny', got 'maybe'",
    ),
    (HEAD + "[federation]\nmode = 1", "federation.mode", "must be a string, got an integer"),
    (HEAD + "federation = 'deny'", "federation", "federation: must be a table, got a string"),
    (
        HEAD + "[federation]\ndomain = []",
        "federation.domain",
        "unknown key 'federation.domain' (did you mean 'domains'?)",
    ),
    (
        HEAD + "[federation]\ndomains = ['ok.example', 42]",
        "federation.domains[1]",
        "federation.domains[1]: must be a string, got an integer (42)",
    ),
    (
        HEAD + "[federation]\ndomains = ['ok.example', ['nested']]",
        "federation.domains[1]",
        "must be a string, got an array",
    ),
    (
        HEAD + "[federation]\ndomains = 'evil.example'",
        "federation.domains",
        "must be an array of strings, got a string",
    ),
    (
        HEAD + "[federation]\ndomains = ['evil*.example']",
        "federation.domains[0]",
        "only 'domain', '*.domain'",
    ),
    (HEAD + "[federation]\ndomains = ['a b.example']", "federation.domains[0]", "bad label"),
    (
        HEAD + "[federation]\ndomains = [1979-05-27]",
        "federation.domains[0]",
        "must be a string, got a date/time",
    ),
    (
        HEAD + "[federation]\naction = 'allow'",
        "federation.action",
        "must be one of 'flag', 'quarantine', 'reject', 'drop', got 'allow'",
    ),
    (
        HEAD + "[groups.traders]\nmembers = []\n[federation.groups.trader]\nmode = 'deny'",
        "federation.groups.trader",
        "no such group (did you mean 'traders'?); defined in [groups]: traders",
    ),
    (
        HEAD + "[groups.traders]\nmembers = []\n[federation.groups.traders]\ndomains = []",
        "federation.groups.traders.mode",
        "is required",
    ),
    (
        HEAD + "[groups.traders]\nmembers = []\n[federation.groups.traders]\nmode='deny'\nx=1",
        "federation.groups.traders.x",
        "unknown key",
    ),
    (HEAD + "[groups.traders]\n", "groups.traders.members", "is required"),
    (HEAD + "groups = ['traders']", "groups", "must be a table, got an array"),
    (HEAD + "[groups.'bad name']\nmembers = []", 'groups."bad name"', "group names must be"),
    (HEAD + "[groups.t]\nmembers = []\nmember = []", "groups.t.member", "unknown key"),
    (
        HEAD + "[groups.t]\nmembers = ['bob@partner.example']",
        "groups.t.members[0]",
        "'bob@partner.example' is not a local user (partner.example is not in local_domains)",
    ),
    (HEAD + "[groups.t]\nmembers = ['corp.example']", "groups.t.members[0]", "user@domain"),
    (
        HEAD + "[decision]\nfailure_action = 'allow'",
        "decision.failure_action",
        "got 'allow' (a failing rule must never let a stanza pass silently)",
    ),
    (
        HEAD + "[decision]\nquarantine_threshold = '5'",
        "decision.quarantine_threshold",
        "must be a number, got a string",
    ),
    (
        HEAD + "[decision]\nreject_threshold = true",
        "decision.reject_threshold",
        "must be a number, got a boolean",
    ),
    (
        HEAD + "[decision]\nreject_threshold = nan",
        "decision.reject_threshold",
        "must be a finite number",
    ),
    (
        HEAD + "[decision]\nquarantine_threshold = 9\nreject_threshold = 5",
        "decision.quarantine_threshold",
        "(9) must not exceed reject_threshold (5)",
    ),
    (HEAD + "[decision]\nthreshold = 5", "decision.threshold", "unknown key"),
]


@pytest.mark.parametrize(("text", "key", "message"), ERRORS)
def test_policy_errors_name_the_key(text: str, key: str | None, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    assert message in str(info.value)
    assert info.value.key == key
    if key is not None:
        assert str(info.value).startswith(key) or f"'{key}'" in str(info.value)


def test_policy_error_belongs_to_the_tree() -> None:
    with pytest.raises(ClassifierError):
        parse_policy("")
    with pytest.raises(ValueError, match="empty"):
        parse_policy("")


# --- hostile input ------------------------------------------------------------------------


def test_too_many_entries() -> None:
    data = {
        "version": 1,
        "local_domains": ["corp.example"],
        "federation": {"domains": ["x.example"] * (MAX_LIST_ENTRIES + 1)},
    }
    with pytest.raises(PolicyError, match=r"federation.domains: has 100001 entries; at most"):
        policy_from_dict(data)


def test_large_list_is_accepted_and_fast_to_match() -> None:
    domains = ", ".join(f'"d{i}.example"' for i in range(20_000))
    policy = parse_policy(HEAD + f"[federation]\ndomains = [{domains}]\n")
    assert len(policy.federation.domains) == 20_000
    chain = build_chain(policy)
    assert chain.evaluate(make_ctx(sender="x@d19999.example")).action is Action.REJECT
    assert chain.evaluate(make_ctx(sender="x@other.example")).action is Action.ALLOW


def test_huge_string_gives_a_short_error() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(HEAD + f"[federation]\ndomains = ['{'a b' * 100_000}']\n")
    assert len(str(info.value)) < 300


def test_huge_unknown_key_gives_a_short_error() -> None:
    with pytest.raises(PolicyError) as info:
        policy_from_dict({"version": 1, "x" * 100_000: 1})
    assert len(str(info.value)) < 300


def test_deep_nesting() -> None:
    with pytest.raises(PolicyError, match=r"could not be read|not valid TOML"):
        parse_policy("x = " + "[" * 5000 + "]" * 5000)


def test_absurd_integers() -> None:
    with pytest.raises(PolicyError):
        parse_policy("version = " + "9" * 5000)
    with pytest.raises(PolicyError, match="version: unsupported policy version"):
        policy_from_dict({"version": 10**5000})
    with pytest.raises(PolicyError, match="too large"):
        policy_from_dict(
            {
                "version": 1,
                "local_domains": ["c.example"],
                "decision": {"reject_threshold": 10**400},
            }
        )


def test_oversized_text() -> None:
    with pytest.raises(PolicyError, match="larger than"):
        parse_policy("#" * (16 * 1024 * 1024 + 1))


@pytest.mark.parametrize(
    "data",
    [
        [],
        "version = 1",
        {1: 2},
        {"version": 1, "local_domains": ["c.example"], "groups": {1: {}}},
        {"version": 1, "local_domains": ["c.example"], "federation": None},
        {"version": 1, "local_domains": ("c.example", None)},
        {"version": 1.0, "local_domains": ["c.example"]},
    ],
)
def test_wrong_shapes_from_dict(data: Any) -> None:
    with pytest.raises(PolicyError):
        policy_from_dict(data)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["deny", "allow", "corp.example", "*.x.example", "a@corp.example"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["mode", "domains", "members", "groups", "g", "action", "x"])
            | st.text(max_size=5),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)
_documents = st.fixed_dictionaries(
    {},
    optional={
        "version": st.sampled_from([1, 2, "1", True]) | _json,
        "local_domains": st.just(["corp.example"]) | _json,
        "groups": st.just({"g": {"members": ["*@corp.example"]}}) | _json,
        "federation": st.fixed_dictionaries(
            {},
            optional={
                "mode": st.sampled_from(["allow", "deny", "maybe"]) | _json,
                "domains": _json,
                "groups": st.just({"g": {"mode": "allow"}}) | _json,
                "action": _json,
            },
        )
        | _json,
        "decision": _json,
        "extra": _json,
    },
)


@settings(max_examples=300)
@given(_documents)
def test_arbitrary_documents_give_a_policy_or_a_policy_error(data: dict[str, Any]) -> None:
    try:
        policy = policy_from_dict(data)
    except PolicyError as exc:
        assert str(exc)
    else:
        assert policy_from_dict(policy_to_dict(policy)) == policy
        build_chain(policy).evaluate(make_ctx())


@given(st.text(max_size=300))
def test_arbitrary_text_gives_a_policy_or_a_policy_error(text: str) -> None:
    with contextlib.suppress(PolicyError):
        parse_policy(text)


# --- canonical form and fingerprint ---------------------------------------------------------


def test_round_trip() -> None:
    policy = parse_policy(EXAMPLE)
    assert policy_from_dict(policy_to_dict(policy)) == policy


def test_fingerprint_ignores_spelling_and_order() -> None:
    reordered = textwrap.dedent(
        """
        # same policy, written differently
        [decision]
        reject_threshold = 10
        quarantine_threshold = 5.0

        [federation.groups.traders]
        domains = ["*.Partner.example", "PARTNER.example", "partner.example"]
        mode = "allow"

        [federation]
        domains = ["*.spam.example", "Spam.Example."]

        [groups.traders]
        members = ["Alice@corp.example", "*@traders.corp.example"]
        """
    )
    head = (
        "version = 1\n"
        'local_domains = ["conference.corp.example", "Corp.Example", "traders.corp.example"]\n'
    )
    assert policy_fingerprint(parse_policy(head + reordered)) == policy_fingerprint(
        parse_policy(EXAMPLE)
    )


def test_fingerprint_changes_with_meaning() -> None:
    base = policy_fingerprint(parse_policy(EXAMPLE))
    assert len(base) == 64
    changed = EXAMPLE.replace('"spam.example", ', '"spam.example", "more.example", ')
    assert policy_fingerprint(parse_policy(changed)) != base
    stricter = EXAMPLE.replace('failure_action = "quarantine"', 'failure_action = "reject"')
    assert policy_fingerprint(parse_policy(stricter)) != base


# --- chain building -----------------------------------------------------------------------


def test_build_chain_enforces_the_policy() -> None:
    policy = parse_policy(EXAMPLE)
    chain = build_chain(policy)
    assert chain.rule_ids == ("federation",)
    assert chain.failure_action is Action.QUARANTINE
    assert (chain.thresholds.quarantine, chain.thresholds.reject) == (5.0, 10.0)
    assert chain.policy_fingerprint == policy_fingerprint(policy)

    spam = chain.evaluate(make_ctx(sender="x@chat.spam.example"))
    assert spam.action is Action.REJECT
    assert spam.policy_fingerprint == policy_fingerprint(policy)

    trader_out = make_ctx(
        direction=Direction.OUTBOUND,
        sender="tom@traders.corp.example",
        recipient="y@elsewhere.example",
    )
    verdict = chain.evaluate(trader_out)
    assert verdict.action is Action.REJECT
    assert verdict.reason_text == (
        "federation with elsewhere.example is not allowed for group traders (not on the allow-list)"
    )
    assert chain.evaluate(make_ctx(sender="x@elsewhere.example")).action is Action.ALLOW


def test_build_chain_failure_action() -> None:
    policy = parse_policy(HEAD + '[decision]\nfailure_action = "drop"\n')
    assert build_chain(policy).failure_action is Action.DROP


class TestPolicyHolder:
    def test_swap(self) -> None:
        holder = PolicyHolder(parse_policy(HEAD))
        ctx = make_ctx(recipient="bob@corp.example", sender="x@evil.example")
        assert holder.evaluate(ctx).action is Action.ALLOW
        old = holder.replace_text(HEAD + '[federation]\ndomains = ["evil.example"]\n')
        assert old.policy == parse_policy(HEAD)
        assert holder.evaluate(ctx).action is Action.REJECT
        assert holder.current.fingerprint == policy_fingerprint(holder.current.policy)
        assert holder.current.chain.policy_fingerprint == holder.current.fingerprint

    def test_bad_policy_keeps_the_current_one(self) -> None:
        holder = PolicyHolder(parse_policy(EXAMPLE))
        before = holder.current
        with pytest.raises(PolicyError):
            holder.replace_text(HEAD + "[federation]\nmode = 'maybe'\n")
        assert holder.current is before

    def test_metrics_survive_reloads(self) -> None:
        metrics = RuleMetrics()
        holder = PolicyHolder(parse_policy(HEAD), metrics=metrics)
        holder.evaluate(make_ctx())
        holder.replace(parse_policy(EXAMPLE))
        holder.evaluate(make_ctx())
        assert holder.metrics is metrics
        assert metrics.snapshot().rules["federation"].evaluations == 2
