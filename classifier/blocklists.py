"""Block lists of domains, JIDs, SHA-256 hashes of JIDs and URL hosts, and the rule using them.

Entries come from several *sources*: the policy itself (source ``"policy"``), list files the
edge reads (JabberSPAM's ``blacklist.txt``, local files) and real-time block lists (XEP-0060
pubsub nodes such as xmppbl.org's ``spam_source_domains``, whose item ids are the entries).
A `BlockList` keeps, for every entry, which sources list it, so a retraction by one source
never removes what another still lists, and a source can be refreshed or dropped as a whole.

Kinds of list and how an entry matches:

- ``domains``: domain patterns as in `classifier.patterns` (``spam.example`` exactly,
  ``*.spam.example`` its subdomains); matched against the remote party's domain.
- ``jids``: bare JIDs (``user@domain``); matched against the remote party's bare JID.
- ``jid_sha256``: lower-case hex SHA-256 of a bare JID, as xmppbl.org and Prosody's
  ``mod_anti_spam`` publish them (node ``spam_source_jids_sha256``, and ``muc_bans_sha256``).
- ``url_hosts``: host names; a URL in the stanza matches if its host is the entry or any
  subdomain of it (``evil.example`` covers ``www.evil.example``), as URL lists are meant.

Parsing is pure: `parse_blocklist_text` takes the text the edge read.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from urllib.parse import urlsplit

from classifier.context import DecisionContext, Direction
from classifier.errors import RuleError
from classifier.jid import normalise_bare, normalise_domain, split_jid
from classifier.patterns import ANY_DOMAIN, parse_domain_pattern, parse_member_pattern
from classifier.rules import RuleResult
from classifier.trust import TrustResolver
from classifier.verdict import Action


class ListKind(StrEnum):
    """What the entries of a list are."""

    DOMAINS = "domains"
    JIDS = "jids"
    JID_SHA256 = "jid_sha256"
    URL_HOSTS = "url_hosts"


JABBERSPAM = "jabberspam"
"""`parse_blocklist_text` format name of JabberSPAM's ``blacklist.txt``: one domain a line."""

POLICY_SOURCE = "policy"
"""Source name of the entries written in the policy's ``[blocklists]`` section."""

# xmppbl.org / Prosody mod_anti_spam / mod_muc_rtbl node names (what StanzaGuard's
# subscriber reads and its publisher writes) and the kind of their item ids.
SPAM_SOURCE_DOMAINS_NODE = "spam_source_domains"
SPAM_SOURCE_JIDS_NODE = "spam_source_jids_sha256"
MUC_BANS_NODE = "muc_bans_sha256"
RTBL_NODE_KINDS: Mapping[str, ListKind] = MappingProxyType(
    {
        SPAM_SOURCE_DOMAINS_NODE: ListKind.DOMAINS,
        SPAM_SOURCE_JIDS_NODE: ListKind.JID_SHA256,
        MUC_BANS_NODE: ListKind.JID_SHA256,
    }
)

MAX_LIST_TEXT = 64 * 1024 * 1024
MAX_SOURCE_NAME = 200
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _q(text: str) -> str:
    """Quote hostile text for an error message, cut short."""
    return repr(text) if len(text) <= 80 else repr(text[:77]) + "..."


def parse_entry(kind: ListKind | str, entry: str) -> str:
    """Validate one entry of a list of ``kind``; return its normalised form.

    Raises:
        RuleError: naming the entry and what is wrong with it.
    """
    list_kind = _kind(kind)
    text = entry.strip()
    if list_kind is ListKind.DOMAINS:
        if text == ANY_DOMAIN:
            raise RuleError("'*' would block every domain; list domains one by one")
        return parse_domain_pattern(text)
    if list_kind is ListKind.JIDS:
        local, _, resource = split_jid(text)
        if local is None:
            raise RuleError(
                f"{_q(entry)}: give a bare JID 'user@domain' (put domains under domains)"
            )
        if local == "*":
            raise RuleError(f"{_q(entry)}: to block a whole domain, list it under domains")
        if resource is not None:
            raise RuleError(f"{_q(entry)}: give a bare JID, without a '/resource'")
        return parse_member_pattern(text)
    if list_kind is ListKind.JID_SHA256:
        digest = text.lower()
        if not _SHA256_HEX.fullmatch(digest):
            raise RuleError(f"{_q(entry)}: must be a SHA-256 in hex (64 characters 0-9, a-f)")
        return digest
    if "://" in text or "/" in text:
        raise RuleError(f"{_q(entry)}: give only the host name, not a URL")
    if text.startswith("*"):
        raise RuleError(f"{_q(entry)}: URL hosts always cover their subdomains; drop the '*.'")
    return parse_domain_pattern(text)


def _kind(kind: ListKind | str) -> ListKind:
    try:
        return ListKind(kind)
    except ValueError:
        known = ", ".join(k.value for k in ListKind)
        raise RuleError(f"unknown list kind {_q(str(kind))}; known: {known}") from None


@dataclass(frozen=True, slots=True)
class ParsedList:
    """The result of `parse_blocklist_text`.

    Attributes:
        kind: The kind of the entries (``domains`` for the JabberSPAM format).
        entries: Normalised entries, in file order, without duplicates.
        skipped: ``(line number, problem)`` of each invalid line, when not parsing strictly.
    """

    kind: ListKind
    entries: tuple[str, ...]
    skipped: tuple[tuple[int, str], ...] = ()


def parse_blocklist_text(text: str, kind: ListKind | str, *, strict: bool = True) -> ParsedList:
    """Parse the text of a list file.

    Formats:
        ``domains``, ``jids``, ``jid_sha256``, ``url_hosts``: one entry a line; blank lines and
        comments (from ``#`` to the end of the line) are ignored.

        ``jabberspam``: JabberSPAM's ``blacklist.txt``: one domain a line (LF or CRLF), no
        comments, no wildcards; each domain is blocked exactly, not its subdomains (as
        Prosody's and ejabberd's consumers of that file match it). Blank lines are ignored.

    Strict parsing fails on the first bad line, so a broken download (an HTML error page)
    never replaces a good list; ``strict=False`` skips bad lines and reports them.

    Raises:
        RuleError: on an unknown kind, text over 64 MiB, or (strict) a bad line, naming the
            line number.
    """
    jabberspam = kind == JABBERSPAM
    list_kind = ListKind.DOMAINS if jabberspam else _kind(kind)
    if len(text) > MAX_LIST_TEXT:
        raise RuleError(f"list text is larger than {MAX_LIST_TEXT} characters")
    entries: dict[str, None] = {}
    skipped: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip() if jabberspam else raw.partition("#")[0].strip()
        if not line:
            continue
        try:
            if jabberspam and (line.startswith("#") or "*" in line):
                raise RuleError(
                    f"{_q(line)}: the JabberSPAM format has one plain domain a line "
                    "(no comments, no wildcards)"
                )
            entries[parse_entry(list_kind, line)] = None
        except RuleError as exc:
            if strict:
                raise RuleError(f"line {number}: {exc}") from None
            skipped.append((number, str(exc)))
    return ParsedList(list_kind, tuple(entries), tuple(skipped))


@dataclass(frozen=True, slots=True)
class ListHit:
    """A match: which list kind, which entry, listed by which sources (sorted)."""

    kind: ListKind
    entry: str
    sources: tuple[str, ...]


def _check_source(source: str) -> str:
    if not isinstance(source, str) or not source or len(source) > MAX_SOURCE_NAME:
        raise RuleError(f"a source name must be 1-{MAX_SOURCE_NAME} characters")
    return source


def jid_hashes(jid: str) -> tuple[str, ...]:
    """SHA-256 (hex) of a bare JID in the spellings a list publisher may have hashed.

    The normalised form (domain in A-labels), and the Unicode form of the domain when it
    differs: Prosody hashes JIDs with Unicode domains.
    """
    bare = normalise_bare(jid)
    forms = [str(bare)]
    if "xn--" in bare.domain:
        labels = []
        for label in bare.domain.split("."):
            if label.startswith("xn--"):
                with contextlib.suppress(UnicodeError, ValueError):
                    label = label[4:].encode("ascii").decode("punycode")
            labels.append(label)
        unicode_domain = unicodedata.normalize("NFC", ".".join(labels))
        local = "" if bare.localpart is None else f"{bare.localpart}@"
        forms.append(f"{local}{unicode_domain}")
    return tuple(
        hashlib.sha256(form.encode("utf-8", "surrogatepass")).hexdigest()
        for form in dict.fromkeys(forms)
    )


def url_host(url: str) -> str | None:
    """The normalised host of a URL, or ``None`` if it has none or cannot be parsed."""
    try:
        host = urlsplit(url.strip()).hostname
    except ValueError:  # e.g. an unbalanced '[' in an IPv6 literal
        return None
    return normalise_domain(host) if host else None


class BlockList:
    """A live, thread-safe set of block-list entries from named sources.

    The RTBL client calls `add` on an item publish, `remove` on a retract, `clear` on a
    purge and `replace` after fetching all items (at start and after a reconnect); the
    ``on_*`` methods do the same without raising on a bad item id. File refreshes call
    `replace` with a `ParsedList`'s entries.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # kind -> entry -> sources listing it
        self._entries: dict[ListKind, dict[str, set[str]]] = {k: {} for k in ListKind}
        # domain patterns split for O(labels) lookups: exact and "*." suffixes
        self._domain_suffixes: dict[str, set[str]] = {}

    @classmethod
    def of(
        cls,
        *,
        source: str = POLICY_SOURCE,
        domains: Iterable[str] = (),
        jids: Iterable[str] = (),
        jid_sha256: Iterable[str] = (),
        url_hosts: Iterable[str] = (),
    ) -> BlockList:
        """A list holding the given entries under one source.

        Raises:
            RuleError: if an entry is invalid.
        """
        blocklist = cls()
        for kind, entries in (
            (ListKind.DOMAINS, domains),
            (ListKind.JIDS, jids),
            (ListKind.JID_SHA256, jid_sha256),
            (ListKind.URL_HOSTS, url_hosts),
        ):
            blocklist.replace(kind, entries, source=source)
        return blocklist

    # --- updates ---------------------------------------------------------------------------

    def _table(self, kind: ListKind, entry: str) -> dict[str, set[str]]:
        if kind is ListKind.DOMAINS and entry.startswith("*."):
            return self._domain_suffixes
        return self._entries[kind]

    def _add(self, kind: ListKind, entry: str, source: str) -> bool:
        table = self._table(kind, entry)
        key = entry[2:] if table is self._domain_suffixes else entry
        sources = table.setdefault(key, set())
        new = source not in sources
        sources.add(source)
        return new

    def _remove(self, kind: ListKind, entry: str, source: str) -> bool:
        table = self._table(kind, entry)
        key = entry[2:] if table is self._domain_suffixes else entry
        sources = table.get(key)
        if sources is None or source not in sources:
            return False
        sources.discard(source)
        if not sources:
            del table[key]
        return True

    def add(self, kind: ListKind | str, entry: str, *, source: str) -> bool:
        """List ``entry`` under ``source``; return whether it was new for that source.

        Raises:
            RuleError: if the kind, the entry or the source name is invalid.
        """
        list_kind, parsed = _kind(kind), parse_entry(kind, entry)
        _check_source(source)
        with self._lock:
            return self._add(list_kind, parsed, source)

    def remove(self, kind: ListKind | str, entry: str, *, source: str) -> bool:
        """Withdraw ``source``'s listing of ``entry``; return whether it was listed by it.

        Other sources listing the same entry keep it blocked.

        Raises:
            RuleError: if the kind or the entry is invalid.
        """
        list_kind, parsed = _kind(kind), parse_entry(kind, entry)
        with self._lock:
            return self._remove(list_kind, parsed, source)

    def replace(self, kind: ListKind | str, entries: Iterable[str], *, source: str) -> None:
        """Make ``entries`` the complete list of ``kind`` from ``source``.

        Every entry is validated first, so an invalid one leaves the list unchanged.

        Raises:
            RuleError: if the kind, an entry or the source name is invalid.
        """
        list_kind = _kind(kind)
        _check_source(source)
        parsed = {parse_entry(list_kind, e) for e in entries}
        with self._lock:
            for old in self._entries_of(list_kind, source):
                if old not in parsed:
                    self._remove(list_kind, old, source)
            for entry in parsed:
                self._add(list_kind, entry, source)

    def clear(self, source: str | None = None) -> None:
        """Drop every entry of ``source`` (an RTBL purge), or of every source."""
        with self._lock:
            if source is None:
                for table in (*self._entries.values(), self._domain_suffixes):
                    table.clear()
                return
            for kind in ListKind:
                for entry in self._entries_of(kind, source):
                    self._remove(kind, entry, source)

    def on_publish(self, source: str, kind: ListKind | str, item_id: str) -> bool:
        """An RTBL item was published; return False if its id is not a valid entry."""
        try:
            self.add(kind, item_id, source=source)
        except RuleError:
            return False
        return True

    def on_retract(self, source: str, kind: ListKind | str, item_id: str) -> bool:
        """An RTBL item was retracted; return whether ``source`` had listed it."""
        try:
            return self.remove(kind, item_id, source=source)
        except RuleError:
            return False

    def on_items(
        self, source: str, kind: ListKind | str, item_ids: Iterable[str]
    ) -> tuple[str, ...]:
        """All items of an RTBL node were fetched: replace ``source``'s entries with them.

        Invalid ids are left out rather than failing the whole refresh (a remote list is
        not ours to fix); they are returned so the caller can log them.
        """
        valid: list[str] = []
        invalid: list[str] = []
        for item_id in item_ids:
            try:
                parse_entry(kind, item_id)
            except RuleError:
                invalid.append(item_id)
            else:
                valid.append(item_id)
        self.replace(kind, valid, source=source)
        return tuple(invalid)

    def on_purge(self, source: str) -> None:
        """An RTBL node was purged."""
        self.clear(source)

    # --- reading ---------------------------------------------------------------------------

    def _entries_of(self, kind: ListKind, source: str | None) -> list[str]:
        tables = [(self._entries[kind], "")]
        if kind is ListKind.DOMAINS:
            tables.append((self._domain_suffixes, "*."))
        return [
            prefix + key
            for table, prefix in tables
            for key, sources in table.items()
            if source is None or source in sources
        ]

    def entries(self, kind: ListKind | str, *, source: str | None = None) -> tuple[str, ...]:
        """The entries of ``kind`` (of one source, or all), sorted."""
        list_kind = _kind(kind)
        with self._lock:
            return tuple(sorted(self._entries_of(list_kind, source)))

    def sources(self) -> tuple[str, ...]:
        """Every source that lists at least one entry, sorted."""
        with self._lock:
            found: set[str] = set()
            for table in (*self._entries.values(), self._domain_suffixes):
                for sources in table.values():
                    found |= sources
        return tuple(sorted(found))

    def __len__(self) -> int:
        """Distinct entries over all kinds."""
        with self._lock:
            return sum(len(t) for t in self._entries.values()) + len(self._domain_suffixes)

    def _hit(self, kind: ListKind, entry: str, sources: set[str] | None) -> ListHit | None:
        return None if not sources else ListHit(kind, entry, tuple(sorted(sources)))

    def match_domain(self, domain: str) -> ListHit | None:
        """The entry of the domains list covering ``domain``, preferring an exact one."""
        return self._match_domain(normalise_domain(domain))

    def match_jid(self, jid: str) -> ListHit | None:
        """The entry of the JID list or of the SHA-256 list matching the bare ``jid``."""
        bare = normalise_bare(jid)
        if bare.localpart is None:
            return None
        hit = self._match_bare(str(bare))
        if hit is None and self.has(ListKind.JID_SHA256):
            hit = self._match_hashes(jid_hashes(jid))
        return hit

    def match_url(self, url: str) -> ListHit | None:
        """The URL-host entry covering the host of ``url`` (the host or a parent domain)."""
        host = url_host(url)
        return None if host is None else self._match_host(host)

    def has(self, kind: ListKind) -> bool:
        """Whether the list of ``kind`` has any entry (lets callers skip costly lookups)."""
        if kind is ListKind.DOMAINS:
            return bool(self._entries[kind] or self._domain_suffixes)
        return bool(self._entries[kind])

    # The matchers below take normalised values, so a rule consulting several lists
    # normalises (and hashes) each value once.

    def _match_domain(self, name: str) -> ListHit | None:
        with self._lock:
            hit = self._hit(ListKind.DOMAINS, name, self._entries[ListKind.DOMAINS].get(name))
            if hit is not None or not self._domain_suffixes:
                return hit
            start = name.find(".")
            while start != -1:
                suffix = name[start + 1 :]
                sources = self._domain_suffixes.get(suffix)
                if sources:
                    return ListHit(ListKind.DOMAINS, f"*.{suffix}", tuple(sorted(sources)))
                start = name.find(".", start + 1)
        return None

    def _match_bare(self, bare: str) -> ListHit | None:
        with self._lock:
            return self._hit(ListKind.JIDS, bare, self._entries[ListKind.JIDS].get(bare))

    def _match_hashes(self, digests: Iterable[str]) -> ListHit | None:
        table = self._entries[ListKind.JID_SHA256]
        with self._lock:
            for digest in digests:
                hit = self._hit(ListKind.JID_SHA256, digest, table.get(digest))
                if hit is not None:
                    return hit
        return None

    def _match_host(self, host: str) -> ListHit | None:
        table = self._entries[ListKind.URL_HOSTS]
        with self._lock:
            if not table:
                return None
            name: str | None = host
            while name:
                sources = table.get(name)
                if sources:
                    return ListHit(ListKind.URL_HOSTS, name, tuple(sorted(sources)))
                _, dot, rest = name.partition(".")
                name = rest if dot else None
        return None


# --- the rule -------------------------------------------------------------------------------

_REFUSALS = frozenset({Action.FLAG, Action.QUARANTINE, Action.REJECT, Action.DROP})
_WHAT = {
    ListKind.DOMAINS: "domain",
    ListKind.JIDS: "address",
    ListKind.JID_SHA256: "address",
    ListKind.URL_HOSTS: "link to",
}


class BlocklistRule:
    """Refuses stanzas whose remote party or links are on a block list.

    Checked per direction: for INBOUND stanzas the sender and the room (when remote) and
    the URLs; for OUTBOUND ones the recipient and the room (when remote) and the URLs. Local
    JIDs are never looked up. With ``exempt_contacts``, a party the local user knows
    (roster, recent correspondent) is not checked against the domain and JID lists, like
    Prosody's and ejabberd's filters; URLs are checked for everyone, because a known
    contact's account can be compromised.

    The action of a hit is the first of: the action for one of its sources, the action for
    its kind, the default action; a hit listed by several sources takes the most severe, and
    of several hits the most severe wins.
    """

    def __init__(
        self,
        lists: Sequence[BlockList],
        *,
        action: Action = Action.REJECT,
        kind_actions: Mapping[ListKind, Action] | None = None,
        source_actions: Mapping[str, Action] | None = None,
        directions: Iterable[Direction] = (Direction.INBOUND,),
        trust: TrustResolver | None = None,
        exempt_contacts: bool = True,
        rule_id: str = "blocklist",
    ) -> None:
        """Create the rule.

        Args:
            lists: The lists to consult (the policy's own, the edge's live one...).
            action: Default action of a hit: REJECT (bounce with the reason).
            kind_actions: Actions per list kind.
            source_actions: Actions per source name (wins over the kind's).
            directions: The directions checked; INBOUND only by default.
            trust: Who knows whom, for ``exempt_contacts``.
            exempt_contacts: Skip the domain and JID lists for known contacts.
            rule_id: Name in reasons and metrics.

        Raises:
            RuleError: if any action is ALLOW.
        """
        kind_actions = dict(kind_actions or {})
        source_actions = dict(source_actions or {})
        for value in (action, *kind_actions.values(), *source_actions.values()):
            if value not in _REFUSALS:
                raise RuleError(f"BlocklistRule actions must be refusals, got {value!r}")
        self._lists = tuple(lists)
        self._action = action
        self._kind_actions = kind_actions
        self._source_actions = source_actions
        self._directions = frozenset(directions)
        self._trust = trust or TrustResolver()
        self._exempt = exempt_contacts
        self._rule_id = rule_id

    @property
    def rule_id(self) -> str:
        return self._rule_id

    @property
    def description(self) -> str:
        return "the remote party's domain or JID, or a linked host, is on a block list"

    def _action_of(self, hit: ListHit) -> Action:
        actions = [self._source_actions[s] for s in hit.sources if s in self._source_actions]
        if actions:
            return max(actions, key=lambda a: a.severity)
        return self._kind_actions.get(hit.kind, self._action)

    def _hits(self, ctx: DecisionContext) -> list[tuple[ListHit, str]]:
        hits: list[tuple[ListHit, str]] = []
        if ctx.direction is Direction.INBOUND:
            parties = [ctx.sender, ctx.room]
        else:
            parties = [ctx.recipient, ctx.room]
        remote = [p for p in dict.fromkeys(parties) if p is not None and ctx.is_remote(p)]
        if remote and not (self._exempt and self._trust.known(ctx) is True):
            hashed = any(b.has(ListKind.JID_SHA256) for b in self._lists)
            for party in remote:
                bare = normalise_bare(party)
                digests = jid_hashes(party) if hashed and bare.localpart is not None else ()
                for blocklist in self._lists:
                    by_domain = blocklist._match_domain(bare.domain)
                    if by_domain is not None:
                        hits.append((by_domain, bare.domain))
                    if bare.localpart is None:
                        continue
                    by_jid = blocklist._match_bare(str(bare))
                    if by_jid is None and digests:
                        by_jid = blocklist._match_hashes(digests)
                    if by_jid is not None:
                        hits.append((by_jid, str(bare)))
        if ctx.urls and any(b.has(ListKind.URL_HOSTS) for b in self._lists):
            for host in dict.fromkeys(url_host(url) for url in ctx.urls):
                if host is None:
                    continue
                for blocklist in self._lists:
                    by_host = blocklist._match_host(host)
                    if by_host is not None:
                        hits.append((by_host, host))
        return hits

    def evaluate(self, ctx: DecisionContext) -> RuleResult | None:
        if ctx.direction not in self._directions:
            return None
        hits = self._hits(ctx)
        if not hits:
            return None
        hit, value = max(hits, key=lambda h: self._action_of(h[0]).severity)
        shown = value if len(value) <= 100 else value[:97] + "..."
        return RuleResult(
            self._action_of(hit),
            0.0,
            f"{_WHAT[hit.kind]} {shown} is on a block list ({', '.join(hit.sources)})",
        )
