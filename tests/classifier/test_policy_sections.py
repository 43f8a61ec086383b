"""The anti-SPIM and compliance sections of the policy, and the chain built from them."""

from __future__ import annotations

import hashlib
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from classifier.blocklists import BlockList, ListKind
from classifier.chain import RuleMetrics
from classifier.context import DecisionContext, Direction, StanzaKind
from classifier.errors import PolicyError
from classifier.limits import InMemoryCounterStore
from classifier.policy import (
    BarrierPolicy,
    BlocklistPolicy,
    DuplicatesPolicy,
    EncryptionPolicy,
    LexiconPolicy,
    LimitsPolicy,
    ModelPolicy,
    PolicyHolder,
    StrangerPolicy,
    build_chain,
    parse_policy,
    policy_fingerprint,
    policy_from_dict,
    policy_to_dict,
)
from classifier.trust import InMemoryTrustStore, RosterItem, Subscription
from classifier.verdict import Action
from tests.classifier.helpers import CLOCK, make_ctx

HEAD = textwrap.dedent(
    """
    version = 1
    local_domains = ["corp.example", "research.corp.example", "conference.corp.example"]

    [groups.research]
    members = ["*@research.corp.example"]

    [groups.traders]
    members = ["tom@corp.example", "tina@corp.example"]
    """
)
LOCAL = frozenset({"corp.example", "research.corp.example", "conference.corp.example"})

FULL = HEAD + textwrap.dedent(
    f"""
    [decision]
    quarantine_threshold = 5.0
    reject_threshold = 10.0

    [strangers]
    quarantine_threshold = 2.0
    reject_threshold = 6.0
    first_contact_url = "quarantine"

    [blocklists]
    domains = ["spam.example", "*.spam.example"]
    jids = ["bad@x.example"]
    jid_sha256 = ["{hashlib.sha256(b"worse@y.example").hexdigest()}"]
    url_hosts = ["evil.example"]
    action = "reject"
    kind_actions = {{ url_hosts = "quarantine" }}
    source_actions = {{ "xmppbl.org/spam_source_domains" = "quarantine" }}

    [[barriers]]
    between = ["traders", "research"]

    [encryption]
    omemo = "reject"
    openpgp = "flag"

    [limits]
    per_sender_per_minute = 3
    new_recipients_per_minute = 20
    per_domain_per_minute = 600

    [duplicates]
    recipients = 3
    window_seconds = 300

    [[lexicons]]
    name = "guarantees"
    terms = ["guaranteed return", "risk-free"]
    action = "flag"

    [model]
    weight = 5.0
    quarantine_at = 0.9
    reject_at = 0.99
    strangers_quarantine_at = 0.7
    """
)


def ctx(**overrides: Any) -> DecisionContext:
    return make_ctx(local_domains=LOCAL, **overrides)


# --- parsing --------------------------------------------------------------------------------


def test_full_policy() -> None:
    policy = parse_policy(FULL)
    assert policy.strangers == StrangerPolicy(2.0, 6.0, Action.QUARANTINE, False)
    assert policy.blocklists is not None
    assert policy.blocklists.domains == ("*.spam.example", "spam.example")
    assert policy.blocklists.kind_actions == ((ListKind.URL_HOSTS, Action.QUARANTINE),)
    assert policy.blocklists.source_actions == (
        ("xmppbl.org/spam_source_domains", Action.QUARANTINE),
    )
    assert policy.barriers == (BarrierPolicy(("research", "traders")),)
    assert policy.encryption == EncryptionPolicy(omemo=Action.REJECT, openpgp=Action.FLAG)
    assert policy.limits == LimitsPolicy(per_sender_per_minute=3)
    assert policy.duplicates == DuplicatesPolicy(recipients=3)
    assert policy.lexicons == (LexiconPolicy("guarantees", ("guaranteed return", "risk-free")),)
    assert policy.model == ModelPolicy(weight=5.0, reject_at=0.99, strangers_reject_at=0.99)


def test_sections_with_defaults() -> None:
    text = HEAD + "[strangers]\n[blocklists]\n[encryption]\n[limits]\n[duplicates]\n[model]\n"
    policy = parse_policy(text)
    assert policy.strangers == StrangerPolicy()
    assert policy.strangers.first_contact_url is Action.QUARANTINE
    assert policy.blocklists == BlocklistPolicy()
    assert policy.encryption == EncryptionPolicy()
    assert policy.limits == LimitsPolicy(60, 20, 600, Action.QUARANTINE, (Direction.INBOUND,))
    assert policy.duplicates == DuplicatesPolicy(5, 300.0, Action.QUARANTINE)
    assert policy.model == ModelPolicy(1.0, None, 0.9, None, 0.7, None)


def test_absent_sections_add_nothing_and_keep_old_fingerprints() -> None:
    policy = parse_policy(HEAD)
    assert (policy.strangers, policy.blocklists, policy.model) == (None, None, None)
    assert set(policy_to_dict(policy)) == {
        "version",
        "local_domains",
        "groups",
        "federation",
        "decision",
    }
    assert build_chain(policy).rule_ids == ("federation",)


def test_model_stranger_defaults_follow_lower_general_thresholds() -> None:
    model = parse_policy(HEAD + "[model]\nquarantine_at = 0.5\nreject_at = 0.6\n").model
    assert model is not None
    assert (model.strangers_quarantine_at, model.strangers_reject_at) == (0.5, 0.6)
    off = parse_policy(HEAD + "[model]\nquarantine_at = false\n").model
    assert off is not None
    assert (off.quarantine_at, off.strangers_quarantine_at) == (None, 0.7)
    both_off = parse_policy(
        HEAD + "[model]\nquarantine_at = false\nstrangers_quarantine_at = false\n"
    ).model
    assert both_off is not None and both_off.strangers_quarantine_at is None
    flag = parse_policy(HEAD + "[model]\nflag_at = 0.8\n").model
    assert flag is not None
    assert flag.stranger_thresholds.flag is None  # 0.8 > 0.7: quarantining covers it


def test_directions() -> None:
    policy = parse_policy(HEAD + '[limits]\ndirections = ["outbound", "inbound", "inbound"]\n')
    assert policy.limits is not None
    assert policy.limits.directions == (Direction.INBOUND, Direction.OUTBOUND)


def test_round_trip_and_fingerprint() -> None:
    policy = parse_policy(FULL)
    assert policy_from_dict(policy_to_dict(policy)) == policy
    reordered = FULL.replace(
        'between = ["traders", "research"]', 'between = ["research", "traders"]'
    ).replace(
        'domains = ["spam.example", "*.spam.example"]',
        'domains = ["*.Spam.example", "SPAM.example"]',
    )
    assert policy_fingerprint(parse_policy(reordered)) == policy_fingerprint(policy)
    changed = FULL.replace("recipients = 3", "recipients = 4")
    assert policy_fingerprint(parse_policy(changed)) != policy_fingerprint(policy)


HS = "[blocklists]\n"
ERRORS: list[tuple[str, str, str]] = [
    # (section text, key, message fragment)
    ("[strangers]\nfirst_contact = 'quarantine'", "strangers.first_contact", "did you mean"),
    ("[strangers]\nfirst_contact_url = 'maybe'", "strangers.first_contact_url", "must be one of"),
    ("[strangers]\nunknown_is_stranger = 1", "strangers.unknown_is_stranger", "true or false"),
    (
        "[decision]\nquarantine_threshold = 3\n[strangers]\nquarantine_threshold = 4",
        "strangers.quarantine_threshold",
        "(4) must not exceed decision.quarantine_threshold (3): strangers get stricter",
    ),
    (
        "[decision]\nquarantine_threshold = 3\n[strangers]\nreject_threshold = 2",
        "strangers.reject_threshold",
        "quarantine threshold (3) must not exceed their reject threshold (2)",
    ),
    (HS + "domains = ['ok.example', 'bad domain']", "blocklists.domains[1]", "bad label"),
    (HS + "domains = ['*']", "blocklists.domains[0]", "every domain"),
    (HS + "jids = ['spam.example']", "blocklists.jids[0]", "bare JID"),
    (HS + "jid_sha256 = ['abc']", "blocklists.jid_sha256[0]", "SHA-256"),
    (HS + "url_hosts = ['https://x.example/']", "blocklists.url_hosts[0]", "not a URL"),
    (HS + "action = 'allow'", "blocklists.action", "must be one of 'flag'"),
    (HS + "ips = []", "blocklists.ips", "unknown key"),
    (HS + "kind_actions = { hosts = 'flag' }", "blocklists.kind_actions.hosts", "unknown key"),
    (
        HS + "source_actions = { rtbl = 'allow' }",
        "blocklists.source_actions.rtbl",
        "must be one of",
    ),
    (HS + "directions = []", "blocklists.directions", "must list 'inbound'"),
    (HS + "directions = ['in']", "blocklists.directions[0]", "'inbound' or 'outbound'"),
    (HS + "exempt_contacts = 'yes'", "blocklists.exempt_contacts", "true or false"),
    ("[barriers]\nbetween = ['a', 'b']", "barriers", "must be an array of tables"),
    ("[[barriers]]\nreason = 'x'", "barriers[0].between", "is required"),
    ("[[barriers]]\nbetween = ['research']", "barriers[0].between", "exactly two groups, got 1"),
    (
        "[[barriers]]\nbetween = ['research', 'trader']",
        "barriers[0].between[1]",
        "no such group 'trader' (did you mean 'traders'?); defined in [groups]: research, traders",
    ),
    ("[[barriers]]\nbetween = ['research', 'research']", "barriers[0].between", "twice"),
    (
        "[[barriers]]\nbetween = ['research', 'traders']\n"
        "[[barriers]]\nbetween = ['traders', 'research']",
        "barriers[1].between",
        "already defined",
    ),
    ("[[barriers]]\nbetween = ['research', 'traders']\nreason = ''", "barriers[0].reason", "1-500"),
    ("[[barriers]]\nbetween = ['research', 'traders']\nwhy = ''", "barriers[0].why", "unknown key"),
    ("[encryption]\nomemo = 'block'", "encryption.omemo", "must be one of 'allow'"),
    ("[encryption]\nsignal = 'reject'", "encryption.signal", "known keys in encryption"),
    ("[limits]\nper_sender_per_minute = -1", "limits.per_sender_per_minute", "between 0"),
    ("[limits]\nper_sender_per_minute = 1.5", "limits.per_sender_per_minute", "an integer"),
    ("[limits]\nper_sender_per_minute = true", "limits.per_sender_per_minute", "an integer"),
    ("[limits]\nper_minute = 5", "limits.per_minute", "unknown key"),
    ("[limits]\naction = 'allow'", "limits.action", "must be one of"),
    ("[duplicates]\nrecipients = 1", "duplicates.recipients", "between 2"),
    ("[duplicates]\nwindow_seconds = 0", "duplicates.window_seconds", "above 0"),
    ("[duplicates]\nwindow_seconds = 1e9", "duplicates.window_seconds", "a week"),
    ("[[lexicons]]\nterms = ['x']", "lexicons[0].name", "is required"),
    ("[[lexicons]]\nname = 'a b'\nterms = ['x']", "lexicons[0].name", "lexicon names"),
    ("[[lexicons]]\nname = 'g'", "lexicons[0].terms", "is required"),
    ("[[lexicons]]\nname = 'g'\nterms = []", "lexicons[0].terms", "at least one term"),
    ("[[lexicons]]\nname = 'g'\nterms = ['ok', '!!!']", "lexicons[0].terms[1]", "no letters"),
    (
        "[[lexicons]]\nname = 'g'\nterms = ['x']\naction = 'reject'",
        "lexicons[0].action",
        "must be 'flag' ... (lexicons only flag messages for review; they never block)",
    ),
    (
        "[[lexicons]]\nname = 'g'\nterms = ['x']\n[[lexicons]]\nname = 'g'\nterms = ['y']",
        "lexicons[1].name",
        "already defined",
    ),
    ("[model]\nquarantine_at = 1.5", "model.quarantine_at", "within [0, 1]"),
    ("[model]\nquarantine_at = true", "model.quarantine_at", "or false to switch it off"),
    ("[model]\nreject_at = 0.5", "model.reject_at", "(0.5) must not be below quarantine_at (0.9)"),
    ("[model]\nflag_at = 0.95", "model.quarantine_at", "must not be below flag_at"),
    (
        "[model]\nstrangers_quarantine_at = 0.95",
        "model.strangers_quarantine_at",
        "must not exceed quarantine_at (0.9)",
    ),
    (
        "[model]\nstrangers_quarantine_at = false",
        "model.strangers_quarantine_at",
        "cannot be switched off while quarantine_at is on",
    ),
    (
        "[model]\nreject_at = 0.99\nstrangers_reject_at = false",
        "model.strangers_reject_at",
        "cannot be switched off",
    ),
    (
        "[model]\nreject_at = 0.99\nstrangers_reject_at = 0.6",
        "model.strangers_reject_at",
        "must not be below their quarantine threshold (0.7)",
    ),
    (
        "[model]\nquarantine_at = false\nreject_at = 0.8\nstrangers_quarantine_at = 0.85",
        "model.strangers_quarantine_at",
        "reject threshold (0.8) must not be below their quarantine threshold (0.85)",
    ),
    ("[model]\nweight = 1e7", "model.weight", "within"),
    ("[model]\nweight = 'heavy'", "model.weight", "must be a number"),
    ("[model]\nthreshold = 0.5", "model.threshold", "unknown key"),
]


@pytest.mark.parametrize(("section", "key", "message"), ERRORS)
def test_section_errors_name_the_key(section: str, key: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(HEAD + section + "\n")
    text = str(info.value)
    if "..." in message:
        first, last = message.split(" ... ")
        assert first in text and last in text
    else:
        assert message in text
    assert info.value.key == key
    assert text.startswith(key) or f"'{key}'" in text


# --- the chain ------------------------------------------------------------------------------


def test_rules_run_in_the_designed_order() -> None:
    chain = build_chain(parse_policy(FULL), model=lambda text: 0.1, blocklists=BlockList())
    assert chain.rule_ids == (
        "stranger",
        "blocklist",
        "federation",
        "information-barrier",
        "encryption",
        "limit-sender",
        "limit-new-recipients",
        "limit-domain",
        "duplicate-body",
        "lexicon-guarantees",
        "text-model",
    )


def test_zero_disables_a_limit_and_no_model_means_no_model_rule() -> None:
    policy = parse_policy(HEAD + "[limits]\nnew_recipients_per_minute = 0\n[model]\n")
    assert build_chain(policy).rule_ids == ("federation", "limit-sender", "limit-domain")


def test_live_blocklist_alone_adds_the_rule() -> None:
    live = BlockList()
    live.add("domains", "rtbl-listed.example", source="xmppbl")
    chain = build_chain(parse_policy(HEAD), blocklists=live)
    assert chain.rule_ids == ("blocklist", "federation")
    verdict = chain.evaluate(ctx(sender="a@rtbl-listed.example"))
    assert verdict.action is Action.REJECT
    assert verdict.reason_text == "domain rtbl-listed.example is on a block list (xmppbl)"


class TestFullChain:
    def chain(self, **kwargs: Any) -> Any:
        return build_chain(parse_policy(FULL), **kwargs)

    def test_known_good_passes(self) -> None:
        verdict = self.chain(model=lambda t: 0.05).evaluate(ctx(sender_in_recipient_roster=True))
        assert verdict.action is Action.ALLOW

    def test_stranger_with_url_is_quarantined(self) -> None:
        verdict = self.chain().evaluate(
            ctx(urls=("https://ok.example/",), sender_in_recipient_roster=False)
        )
        assert verdict.action is Action.QUARANTINE
        assert verdict.reasons[0].rule_id == "stranger"

    def test_stranger_test_uses_the_trust_store(self) -> None:
        trust = InMemoryTrustStore()
        trust.set_roster("bob@corp.example", [RosterItem("pal@remote.example", Subscription.BOTH)])
        chain = self.chain(trust=trust)
        url = ("https://ok.example/",)
        assert chain.evaluate(ctx(sender="pal@remote.example", urls=url)).action is Action.ALLOW
        assert chain.evaluate(ctx(sender="new@remote.example", urls=url)).action is (
            Action.QUARANTINE
        )

    def test_blocklists(self) -> None:
        chain = self.chain()
        assert chain.evaluate(ctx(sender="x@a.spam.example")).action is Action.REJECT
        worse = chain.evaluate(ctx(sender="worse@y.example"))
        assert worse.action is Action.REJECT
        link = chain.evaluate(ctx(urls=("http://evil.example/",), sender_in_recipient_roster=True))
        assert link.action is Action.QUARANTINE
        live = BlockList()
        live.add("domains", "fresh.example", source="xmppbl.org/spam_source_domains")
        verdict = self.chain(blocklists=live).evaluate(ctx(sender="a@fresh.example"))
        assert verdict.action is Action.QUARANTINE  # that source's action

    def test_barrier(self) -> None:
        verdict = self.chain().evaluate(
            ctx(
                direction=Direction.OUTBOUND,
                sender="ann@research.corp.example",
                recipient="tom@corp.example",
            )
        )
        assert verdict.action is Action.REJECT
        assert verdict.reason_text == "information barrier between research and traders"

    def test_encryption(self) -> None:
        chain = self.chain()
        contact = {"sender_in_recipient_roster": True}
        assert chain.evaluate(ctx(encryption="omemo", **contact)).action is Action.REJECT
        assert chain.evaluate(ctx(encryption="openpgp", **contact)).action is Action.FLAG
        assert chain.evaluate(ctx(encryption="otr", **contact)).action is Action.ALLOW

    def test_rate_limit(self) -> None:
        chain = self.chain()
        actions = [chain.evaluate(ctx(body=f"message {i} " + "x" * i)).action for i in range(5)]
        assert actions == [Action.ALLOW] * 3 + [Action.QUARANTINE] * 2

    def test_duplicates(self) -> None:
        chain = self.chain()
        actions = [
            chain.evaluate(ctx(sender=f"s{i}@bots.example", recipient=f"u{i}@corp.example")).action
            for i in range(4)
        ]
        assert actions == [Action.ALLOW, Action.ALLOW, Action.QUARANTINE, Action.QUARANTINE]

    def test_lexicon_flags_even_for_contacts_and_outbound(self) -> None:
        verdict = self.chain().evaluate(
            ctx(
                direction=Direction.OUTBOUND,
                sender="tom@corp.example",
                recipient="client@remote.example",
                body="This is a guaranteed return!",
            )
        )
        assert verdict.action is Action.FLAG
        assert verdict.reasons[0].detail == "lexicon guarantees: 'guaranteed return'"

    def test_model_thresholds_and_score(self) -> None:
        chain = self.chain(model=lambda text: 0.8)
        contact = chain.evaluate(ctx(sender_in_recipient_roster=True))
        assert contact.action is Action.ALLOW
        assert contact.score == pytest.approx(4.0)
        stranger = chain.evaluate(ctx(sender_in_recipient_roster=False, sender="a@b.example"))
        assert stranger.action is Action.QUARANTINE
        assert [r.rule_id for r in stranger.reasons] == ["text-model", "score-threshold"]
        assert chain.evaluate(ctx(sender="c@d.example")).action is Action.ALLOW

    def test_stranger_score_thresholds(self) -> None:
        # p = 0.5, weight 5: score 2.5, below the model's own thresholds; the chain's
        # stranger threshold 2 catches it, the general threshold 5 does not.
        chain = self.chain(model=lambda text: 0.5)
        stranger = chain.evaluate(ctx(sender_in_recipient_roster=False))
        assert stranger.action is Action.QUARANTINE
        assert stranger.reasons[-1].detail == (
            "score 2.5 reached the stranger quarantine threshold 2"
        )
        contact = chain.evaluate(ctx(sender="e@f.example", sender_in_recipient_roster=True))
        assert contact.action is Action.ALLOW

    def test_subscription_requests_and_invitations_are_scored(self) -> None:
        chain = self.chain(model=lambda text: 0.95 if "crypto" in text else 0.0)
        for kind in (StanzaKind.SUBSCRIPTION, StanzaKind.MUC_INVITE):
            verdict = chain.evaluate(
                ctx(kind=kind, sender=f"{kind.value}@x.example", body="free crypto, add me")
            )
            assert verdict.action is Action.QUARANTINE
            assert verdict.reasons[0].rule_id == "text-model"


class TestHolder:
    def test_state_survives_reloads(self) -> None:
        counters = InMemoryCounterStore()
        holder = PolicyHolder(parse_policy(FULL), counters=counters, metrics=RuleMetrics())
        assert holder.counters is counters
        for _ in range(3):
            assert holder.evaluate(ctx()).action is Action.ALLOW
        holder.replace_text(FULL.replace("window_seconds = 300", "window_seconds = 600"))
        assert holder.evaluate(ctx()).action is Action.QUARANTINE  # 4th in the minute

    def test_default_counters_are_kept(self) -> None:
        holder = PolicyHolder(parse_policy(FULL))
        first = holder.counters
        holder.replace(parse_policy(FULL))
        assert holder.counters is first

    def test_replace_model(self) -> None:
        holder = PolicyHolder(parse_policy(HEAD + "[model]\n"))
        assert holder.model is None
        before = holder.current
        assert before.chain.rule_ids == ("federation",)
        previous = holder.replace_model(lambda text: 0.99)
        assert previous is before
        after = holder.current
        assert after.chain.rule_ids == ("federation", "text-model")
        assert holder.evaluate(ctx()).action is Action.QUARANTINE
        holder.replace_model(None)
        assert holder.evaluate(ctx()).action is Action.ALLOW

    def test_stateful_parts_are_exposed(self) -> None:
        trust, live = InMemoryTrustStore(), BlockList()
        holder = PolicyHolder(parse_policy(HEAD), trust=trust, blocklists=live)
        assert (holder.trust, holder.blocklists) == (trust, live)


# --- the documentation ----------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "policy.md"


def test_every_toml_example_in_the_docs_is_a_valid_policy() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 2
    for block in blocks:
        text = block if "version" in block else HEAD + block
        parse_policy(text)


# --- hostile documents ----------------------------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 10**6)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(
        ["inbound", "outbound", "flag", "reject", "allow", "research", "traders", "x.example"]
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


def _section(keys: list[str]) -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries({}, optional=dict.fromkeys(keys, _json)) | _json


_sections = st.fixed_dictionaries(
    {},
    optional={
        "strangers": _section(
            ["quarantine_threshold", "reject_threshold", "first_contact_url", "unknown_is_stranger"]
        ),
        "blocklists": _section(
            ["domains", "jids", "jid_sha256", "url_hosts", "action", "kind_actions", "directions"]
        ),
        "barriers": st.lists(_section(["between", "reason", "action"]), max_size=2) | _json,
        "encryption": _section(["omemo", "openpgp", "otr", "other"]),
        "limits": _section(["per_sender_per_minute", "per_domain_per_minute", "action"]),
        "duplicates": _section(["recipients", "window_seconds", "action", "exempt_contacts"]),
        "lexicons": st.lists(_section(["name", "terms", "action"]), max_size=2) | _json,
        "model": _section(["weight", "flag_at", "quarantine_at", "strangers_quarantine_at"]),
    },
)


@settings(max_examples=300, deadline=None)
@given(_sections)
def test_arbitrary_sections_give_a_policy_or_a_policy_error(sections: dict[str, Any]) -> None:
    data = {
        "version": 1,
        "local_domains": sorted(LOCAL),
        "groups": {
            "research": {"members": ["*@research.corp.example"]},
            "traders": {"members": ["tom@corp.example"]},
        },
        **sections,
    }
    try:
        policy = policy_from_dict(data)
    except PolicyError as exc:
        assert str(exc)
        return
    assert policy_from_dict(policy_to_dict(policy)) == policy
    chain = build_chain(policy, model=lambda text: 0.5)
    chain.evaluate(ctx(timestamp=CLOCK.now()))
