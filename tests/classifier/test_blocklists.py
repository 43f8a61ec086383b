from __future__ import annotations

import hashlib

import pytest

from classifier.blocklists import (
    JABBERSPAM,
    POLICY_SOURCE,
    RTBL_NODE_KINDS,
    BlockList,
    BlocklistRule,
    ListHit,
    ListKind,
    jid_hashes,
    parse_blocklist_text,
    parse_entry,
    url_host,
)
from classifier.context import Direction, StanzaKind
from classifier.errors import RuleError
from classifier.trust import InMemoryTrustStore, RosterItem, Subscription, TrustResolver
from classifier.verdict import Action
from tests.classifier.helpers import CLOCK, make_ctx

# The shape of JabberSPAM's blacklist.txt: one lower-case domain a line, LF, final newline.
JABBERSPAM_TEXT = "bashtel.ru\njabber.cd\njabber.sampo.ru\notr.chat\nsj.ms\n"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class TestEntries:
    @pytest.mark.parametrize(
        ("kind", "entry", "normal"),
        [
            ("domains", "Spam.Example.", "spam.example"),
            ("domains", "*.spam.example", "*.spam.example"),
            ("jids", "Bad.Guy@Spam.Example", "bad.guy@spam.example"),
            ("jid_sha256", sha("x@y").upper(), sha("x@y")),
            ("url_hosts", "Evil.Example", "evil.example"),
            ("url_hosts", "192.0.2.1", "192.0.2.1"),
        ],
    )
    def test_valid(self, kind: str, entry: str, normal: str) -> None:
        assert parse_entry(kind, entry) == normal

    @pytest.mark.parametrize(
        ("kind", "entry", "message"),
        [
            ("domains", "*", "every domain"),
            ("domains", "evil*.example", "only 'domain'"),
            ("domains", "a@b.example", "looks like a JID"),
            ("jids", "spam.example", "bare JID"),
            ("jids", "*@spam.example", "under domains"),
            ("jids", "a@b.example/res", "without a '/resource'"),
            ("jid_sha256", "abc", "SHA-256"),
            ("jid_sha256", "g" * 64, "SHA-256"),
            ("url_hosts", "https://evil.example/x", "not a URL"),
            ("url_hosts", "*.evil.example", "subdomains"),
            ("ips", "1.2.3.4", "unknown list kind 'ips'"),
        ],
    )
    def test_invalid(self, kind: str, entry: str, message: str) -> None:
        with pytest.raises(RuleError, match=message):
            parse_entry(kind, entry)


class TestParseText:
    def test_jabberspam_format(self) -> None:
        parsed = parse_blocklist_text(JABBERSPAM_TEXT, JABBERSPAM)
        assert parsed.kind is ListKind.DOMAINS
        assert parsed.entries == ("bashtel.ru", "jabber.cd", "jabber.sampo.ru", "otr.chat", "sj.ms")
        assert parse_blocklist_text(JABBERSPAM_TEXT.replace("\n", "\r\n"), JABBERSPAM) == parsed
        assert parse_blocklist_text("", JABBERSPAM).entries == ()

    def test_jabberspam_blocks_exact_domains(self) -> None:
        blocklist = BlockList()
        blocklist.replace(
            ListKind.DOMAINS,
            parse_blocklist_text(JABBERSPAM_TEXT, JABBERSPAM).entries,
            source="jabberspam",
        )
        assert blocklist.match_domain("jabber.cd") == ListHit(
            ListKind.DOMAINS, "jabber.cd", ("jabberspam",)
        )
        assert blocklist.match_domain("sub.jabber.cd") is None

    @pytest.mark.parametrize("text", ["# comment\nspam.example\n", "*.spam.example\n"])
    def test_jabberspam_has_no_comments_or_wildcards(self, text: str) -> None:
        with pytest.raises(RuleError, match=r"line 1: .*JabberSPAM format"):
            parse_blocklist_text(text, JABBERSPAM)

    def test_html_error_page_is_refused(self) -> None:
        with pytest.raises(RuleError, match="line 1"):
            parse_blocklist_text("<html><body>rate limited</body></html>\n", JABBERSPAM)

    def test_generic_format(self) -> None:
        text = (
            "# spam sources, maintained by the XMPP team\n"
            "\n"
            "spam.example   # since 2026-01\n"
            "  *.spam.example\n"
            "SPAM.example\n"
        )
        assert parse_blocklist_text(text, "domains").entries == ("spam.example", "*.spam.example")
        hashes = f"{sha('a@b.example')}\n# c\n{sha('c@d.example')}\n"
        assert len(parse_blocklist_text(hashes, ListKind.JID_SHA256).entries) == 2

    def test_errors_name_the_line(self) -> None:
        with pytest.raises(RuleError, match=r"line 3: 'not a domain'"):
            parse_blocklist_text("a.example\n\nnot a domain\n", "domains")

    def test_lenient(self) -> None:
        parsed = parse_blocklist_text(
            "a.example\nnot a domain\nb.example\n", "domains", strict=False
        )
        assert parsed.entries == ("a.example", "b.example")
        assert [n for n, _ in parsed.skipped] == [2]

    def test_unknown_kind(self) -> None:
        with pytest.raises(RuleError, match="unknown list kind"):
            parse_blocklist_text("a.example", "servers")


class TestBlockList:
    def test_match_domain(self) -> None:
        blocklist = BlockList.of(domains=["spam.example", "*.evil.example"])
        assert blocklist.match_domain("SPAM.example") == ListHit(
            ListKind.DOMAINS, "spam.example", (POLICY_SOURCE,)
        )
        assert blocklist.match_domain("a.b.evil.example") == ListHit(
            ListKind.DOMAINS, "*.evil.example", (POLICY_SOURCE,)
        )
        assert blocklist.match_domain("evil.example") is None
        assert blocklist.match_domain("notspam.example") is None

    def test_match_jid_and_hash(self) -> None:
        blocklist = BlockList.of(jids=["bad@x.example"], jid_sha256=[sha("worse@y.example")])
        hit = blocklist.match_jid("Bad@X.example/res")
        assert hit is not None and hit.kind is ListKind.JIDS
        hit = blocklist.match_jid("Worse@Y.example/phone")
        assert hit == ListHit(ListKind.JID_SHA256, sha("worse@y.example"), (POLICY_SOURCE,))
        assert blocklist.match_jid("x.example") is None
        assert blocklist.match_jid("good@x.example") is None

    def test_hash_of_a_unicode_domain(self) -> None:
        # Prosody hashes JIDs with their domain in Unicode; ours is in A-labels.
        hashes = jid_hashes("user@bücher.example")
        assert sha("user@xn--bcher-kva.example") in hashes
        assert sha("user@bücher.example") in hashes
        blocklist = BlockList.of(jid_sha256=[sha("user@bücher.example")])
        assert blocklist.match_jid("user@xn--bcher-kva.example") is not None

    def test_match_url(self) -> None:
        blocklist = BlockList.of(url_hosts=["evil.example"])
        for url in (
            "https://evil.example/x",
            "http://WWW.Evil.Example:8080/",
            "https://a.b.evil.example",
        ):
            assert blocklist.match_url(url) == ListHit(
                ListKind.URL_HOSTS, "evil.example", (POLICY_SOURCE,)
            )
        for url in (
            "https://notevil.example/",
            "https://evil.example.com/",
            "not a url",
            "http://[",
        ):
            assert blocklist.match_url(url) is None

    def test_url_host(self) -> None:
        assert url_host("https://user:pw@Host.Example:443/p?q") == "host.example"
        assert url_host("http://[::1") is None
        assert url_host("mailto:x") is None

    def test_sources_are_independent(self) -> None:
        blocklist = BlockList()
        assert blocklist.add("domains", "spam.example", source="rtbl")
        assert not blocklist.add("domains", "Spam.Example", source="rtbl")
        assert blocklist.add("domains", "spam.example", source="file")
        hit = blocklist.match_domain("spam.example")
        assert hit is not None and hit.sources == ("file", "rtbl")
        assert blocklist.remove("domains", "spam.example", source="rtbl")
        assert not blocklist.remove("domains", "spam.example", source="rtbl")
        hit = blocklist.match_domain("spam.example")
        assert hit is not None and hit.sources == ("file",)
        blocklist.clear("file")
        assert blocklist.match_domain("spam.example") is None
        assert len(blocklist) == 0

    def test_replace(self) -> None:
        blocklist = BlockList()
        blocklist.replace("domains", ["a.example", "*.b.example"], source="file")
        blocklist.add("domains", "a.example", source="other")
        blocklist.replace("domains", ["c.example"], source="file")
        assert blocklist.entries("domains", source="file") == ("c.example",)
        assert blocklist.entries("domains") == ("a.example", "c.example")
        with pytest.raises(RuleError):
            blocklist.replace("domains", ["d.example", "bad domain"], source="file")
        assert blocklist.entries("domains", source="file") == ("c.example",)  # unchanged
        assert blocklist.sources() == ("file", "other")
        blocklist.clear()
        assert len(blocklist) == 0

    def test_bad_source(self) -> None:
        with pytest.raises(RuleError, match="source name"):
            BlockList().add("domains", "a.example", source="")

    def test_rtbl_interface(self) -> None:
        blocklist = BlockList()
        source = "xmppbl.org/spam_source_domains"
        kind = RTBL_NODE_KINDS["spam_source_domains"]
        assert blocklist.on_items(source, kind, ["a.example", "b.example", "not valid!"]) == (
            "not valid!",
        )
        assert blocklist.on_publish(source, kind, "c.example")
        assert not blocklist.on_publish(source, kind, "<script>")
        assert blocklist.on_retract(source, kind, "a.example")
        assert not blocklist.on_retract(source, kind, "never.example")
        assert not blocklist.on_retract(source, kind, "<script>")
        assert blocklist.entries(kind) == ("b.example", "c.example")
        hashes = RTBL_NODE_KINDS["spam_source_jids_sha256"]
        assert blocklist.on_publish("xmppbl.org/jids", hashes, sha("spammer@z.example"))
        assert blocklist.match_jid("spammer@z.example") is not None
        blocklist.on_purge(source)
        assert blocklist.entries(kind) == ()
        assert blocklist.match_jid("spammer@z.example") is not None


class TestBlocklistRule:
    lists = BlockList.of(
        domains=["spam.example"],
        jids=["bad@x.example"],
        url_hosts=["evil.example"],
    )

    def test_inbound_sender_domain(self) -> None:
        result = BlocklistRule([self.lists]).evaluate(make_ctx(sender="a@spam.example"))
        assert result is not None
        assert result.action is Action.REJECT
        assert result.detail == "domain spam.example is on a block list (policy)"

    def test_inbound_sender_jid_and_room(self) -> None:
        rule = BlocklistRule([self.lists])
        assert rule.evaluate(make_ctx(sender="bad@x.example")) is not None
        room_ctx = make_ctx(
            kind=StanzaKind.MUC_INVITE,
            sender="friend@ok.example",
            room="r@spam.example",
        )
        assert rule.evaluate(room_ctx) is not None
        assert rule.evaluate(make_ctx()) is None

    def test_urls(self) -> None:
        rule = BlocklistRule([self.lists])
        result = rule.evaluate(make_ctx(urls=("https://www.evil.example/win",)))
        assert result is not None
        assert result.detail == "link to www.evil.example is on a block list (policy)"

    def test_directions(self) -> None:
        out = make_ctx(
            direction=Direction.OUTBOUND,
            sender="bob@corp.example",
            recipient="a@spam.example",
        )
        assert BlocklistRule([self.lists]).evaluate(out) is None
        both = BlocklistRule([self.lists], directions=list(Direction))
        assert both.evaluate(out) is not None

    def test_local_parties_are_not_looked_up(self) -> None:
        lists = BlockList.of(domains=["corp.example"])
        assert BlocklistRule([lists]).evaluate(make_ctx(sender="eve@corp.example")) is None

    def test_contacts_are_exempt_from_sender_lists_but_not_from_urls(self) -> None:
        store = InMemoryTrustStore()
        store.set_roster("bob@corp.example", [RosterItem("a@spam.example", Subscription.BOTH)])
        rule = BlocklistRule([self.lists], trust=TrustResolver(store))
        assert rule.evaluate(make_ctx(sender="a@spam.example")) is None
        with_url = make_ctx(sender="a@spam.example", urls=("https://evil.example",))
        assert rule.evaluate(with_url) is not None
        strict = BlocklistRule([self.lists], trust=TrustResolver(store), exempt_contacts=False)
        assert strict.evaluate(make_ctx(sender="a@spam.example")) is not None

    def test_actions_by_kind_and_source(self) -> None:
        live = BlockList()
        live.add("domains", "rtbl.example", source="xmppbl")
        live.add("domains", "spam.example", source="xmppbl")
        rule = BlocklistRule(
            [self.lists, live],
            kind_actions={ListKind.URL_HOSTS: Action.QUARANTINE},
            source_actions={"xmppbl": Action.FLAG},
        )
        url = rule.evaluate(make_ctx(urls=("http://evil.example",)))
        assert url is not None and url.action is Action.QUARANTINE
        flagged = rule.evaluate(make_ctx(sender="a@rtbl.example"))
        assert flagged is not None and flagged.action is Action.FLAG
        # Listed by the policy (reject) and by xmppbl (flag): the most severe wins.
        both = rule.evaluate(make_ctx(sender="a@spam.example"))
        assert both is not None and both.action is Action.REJECT

    def test_live_updates_apply_immediately(self) -> None:
        live = BlockList()
        rule = BlocklistRule([live])
        ctx = make_ctx(sender="new@fresh-spam.example")
        assert rule.evaluate(ctx) is None
        live.on_publish("rtbl", "domains", "fresh-spam.example")
        assert rule.evaluate(ctx) is not None
        live.on_retract("rtbl", "domains", "fresh-spam.example")
        assert rule.evaluate(ctx) is None

    def test_allow_is_not_an_action(self) -> None:
        with pytest.raises(RuleError):
            BlocklistRule([], action=Action.ALLOW)
        with pytest.raises(RuleError):
            BlocklistRule([], source_actions={"x": Action.ALLOW})

    def test_long_values_are_cut_in_reasons(self) -> None:
        host = ("a" * 60 + ".") * 3 + "evil.example"
        result = BlocklistRule([self.lists]).evaluate(make_ctx(urls=(f"https://{host}/",)))
        assert result is not None and len(result.detail) < 160

    def test_timestamp_is_irrelevant(self) -> None:
        assert BlocklistRule([self.lists]).evaluate(make_ctx(timestamp=CLOCK.now())) is None
