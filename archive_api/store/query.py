"""The officers' search language: one parser, one AST, no backend in sight.

    from:alice@corp.example to:*@partner.example "guaranteed return" -lunch
    after:2026-01-01 before:2026-02-01 verdict:quarantine has:attachment

Every term narrows the result (terms are ANDed, also when a field repeats). A leading `-`
negates any term. Grammar, by term:

- `word`, `word*` (prefix), `"a phrase"`, `"a phrase"*` (its last word a prefix): full
  text over body and subject. Text is matched by token the way the backend's analyser
  splits it (case and diacritics ignored), so `don't` is the phrase `don t`. A text term
  with no letters or digits matches nothing.
- `from:` `to:` `with:` (either side): a full JID (`alice@corp.example/phone`), a bare JID
  (`alice@corp.example`, `conference.corp.example`) or a whole domain (`*@corp.example`,
  exact domain, subdomains not included). Local and domain parts compare case-insensitively.
- `room:`: a room's bare JID, or `*@conference.corp.example` for every room of a service.
- `after:` `before:`: `YYYY-MM-DD` (a UTC day boundary) or an ISO 8601 date-time (UTC when
  it has no offset). The window is half-open: `after:` is inclusive, `before:` exclusive, so
  `after:2026-01-01 before:2026-02-01` is exactly January.
- `type:` chat, groupchat, normal, headline (message types), subscription, report, session,
  call (steps of Jingle calls and whiteboard sessions), file (steps of file offers and
  transfers: Jingle, SI and IBB; and messages that carry an attachment).
- `verdict:` allow, flag, quarantine, reject, drop.
- `has:attachment`, `has:encrypted`, `is:edited` (a correction, or a message that was
  corrected), `is:retracted` (a retraction, or a message that was retracted).

Field names and keyword values are case-insensitive. Errors are `QuerySyntaxError`s that
point at the offending character; nothing else escapes `parse_query`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum

from archive_api.store.errors import QuerySyntaxError
from classifier.verdict import Action

MAX_QUERY_LENGTH = 2000
MAX_TERMS = 50
# Longest JID part XMPP allows (RFC 7622): 1023 octets each for local, domain and resource.
_MAX_JID_PART = 1023


class Party(StrEnum):
    FROM = "from"
    TO = "to"
    WITH = "with"  # either side


class JidKind(StrEnum):
    FULL = "full"  # local@domain/resource
    BARE = "bare"  # local@domain, or a domain-only JID such as a MUC service
    DOMAIN = "domain"  # *@domain: everyone at that exact domain


class TimeBound(StrEnum):
    AFTER = "after"  # inclusive
    BEFORE = "before"  # exclusive


class RecordType(StrEnum):
    CHAT = "chat"
    GROUPCHAT = "groupchat"
    NORMAL = "normal"
    HEADLINE = "headline"
    SUBSCRIPTION = "subscription"
    REPORT = "report"
    SESSION = "session"
    CALL = "call"
    FILE = "file"


class Flag(StrEnum):
    ATTACHMENT = "attachment"  # has:
    ENCRYPTED = "encrypted"  # has:
    EDITED = "edited"  # is:
    RETRACTED = "retracted"  # is:


_HAS_FLAGS = (Flag.ATTACHMENT, Flag.ENCRYPTED)
_IS_FLAGS = (Flag.EDITED, Flag.RETRACTED)


@dataclass(frozen=True, slots=True)
class JidPattern:
    kind: JidKind
    value: str  # normalised; for DOMAIN just the domain, without "*@"

    @property
    def bare(self) -> str:
        """The bare part of a FULL or BARE pattern (for DOMAIN, the domain)."""
        return self.value.split("/", 1)[0]

    def __str__(self) -> str:
        return f"*@{self.value}" if self.kind is JidKind.DOMAIN else self.value


@dataclass(frozen=True, slots=True)
class TextTerm:
    text: str
    phrase: bool = False
    prefix: bool = False  # `word*` or `"a phrase"*`: the last token is a prefix


@dataclass(frozen=True, slots=True)
class PartyTerm:
    party: Party
    jid: JidPattern


@dataclass(frozen=True, slots=True)
class RoomTerm:
    room: JidPattern  # BARE or DOMAIN


@dataclass(frozen=True, slots=True)
class TimeTerm:
    bound: TimeBound
    at: datetime  # timezone-aware, UTC


@dataclass(frozen=True, slots=True)
class TypeTerm:
    type: RecordType


@dataclass(frozen=True, slots=True)
class VerdictTerm:
    action: Action


@dataclass(frozen=True, slots=True)
class FlagTerm:
    flag: Flag


Term = TextTerm | PartyTerm | RoomTerm | TimeTerm | TypeTerm | VerdictTerm | FlagTerm


@dataclass(frozen=True, slots=True)
class Clause:
    term: Term
    negated: bool = False
    # Where the clause started in the source text; not part of equality so that a query
    # built in code equals the same query parsed from text.
    position: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return ("-" if self.negated else "") + _term_text(self.term)


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed search: the conjunction of its clauses. No clauses matches every record."""

    clauses: tuple[Clause, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Query:
        return parse_query(text)

    @classmethod
    def of(cls, *terms: Term | Clause) -> Query:
        """Build a query in code: terms are positive clauses, clauses are taken as they are."""
        return cls(tuple(t if isinstance(t, Clause) else Clause(t) for t in terms))

    @property
    def text_clauses(self) -> tuple[Clause, ...]:
        return tuple(c for c in self.clauses if isinstance(c.term, TextTerm))

    @property
    def filter_clauses(self) -> tuple[Clause, ...]:
        return tuple(c for c in self.clauses if not isinstance(c.term, TextTerm))

    def __str__(self) -> str:
        """Canonical text: `parse_query(str(q)) == q`. Used in audit entries and cursors."""
        return " ".join(str(c) for c in self.clauses)


# --- canonical rendering ---------------------------------------------------------------

_FIELD_RE = re.compile(r"([A-Za-z]+):")


def _is_plain_word(text: str) -> bool:
    """Would `text` re-parse as this very word (no field, quote, negation or wildcard)?"""
    return (
        bool(text)
        and not any(ch.isspace() or ch == '"' for ch in text)
        and not text.startswith("-")
        and not text.endswith("*")
        and _FIELD_RE.match(text) is None
    )


def _term_text(term: Term) -> str:
    match term:
        case TextTerm(text=text, phrase=phrase, prefix=prefix):
            if not phrase and _is_plain_word(text):
                return text + ("*" if prefix else "")
            # A double quote cannot appear inside a phrase; for matching it is only a
            # separator, like the space that replaces it.
            return '"' + text.replace('"', " ") + '"' + ("*" if prefix else "")
        case PartyTerm(party=party, jid=jid):
            return f"{party.value}:{jid}"
        case RoomTerm(room=room):
            return f"room:{room}"
        case TimeTerm(bound=bound, at=at):
            at = at.astimezone(UTC)
            if at.time() == datetime.min.time():
                return f"{bound.value}:{at.date().isoformat()}"
            return f"{bound.value}:{at.isoformat()}"
        case TypeTerm(type=record_type):
            return f"type:{record_type.value}"
        case VerdictTerm(action=action):
            return f"verdict:{action.value}"
        case FlagTerm(flag=flag):
            return f"{'has' if flag in _HAS_FLAGS else 'is'}:{flag.value}"


# --- JIDs ------------------------------------------------------------------------------

_LOCAL_FORBIDDEN = frozenset("\"&'/:<>@")
_DOMAIN_FORBIDDEN = frozenset("\"&'/:<>@\\*")


def normalize_jid(jid: str) -> str:
    """The comparison form of a JID: local and domain parts lower-cased, resource kept.

    The store applies the same function to what it indexes, so both sides always agree.
    """
    bare, sep, resource = jid.partition("/")
    return bare.lower() + sep + resource


def jid_domain(jid: str) -> str:
    """The domain part of a (bare or full) JID, normalised."""
    return normalize_jid(jid).split("/", 1)[0].rpartition("@")[2]


def _check_domain(domain: str, pos: int, fieldname: str) -> str:
    if not domain:
        raise QuerySyntaxError(f"{fieldname}: the domain is empty", pos)
    if domain.endswith("."):  # a fully qualified DNS name; XMPP compares without the dot
        domain = domain[:-1]
    for i, ch in enumerate(domain):
        if ch in _DOMAIN_FORBIDDEN:
            hint = " (wildcards are only allowed as *@domain)" if ch == "*" else ""
            raise QuerySyntaxError(
                f"{fieldname}: character {ch!r} is not allowed in a domain{hint}", pos + i
            )
    labels = domain.split(".")
    offset = 0
    for label in labels:
        if not label:
            raise QuerySyntaxError(f"{fieldname}: empty label in domain {domain!r}", pos + offset)
        offset += len(label) + 1
    if len(domain) > _MAX_JID_PART:
        raise QuerySyntaxError(f"{fieldname}: the domain is too long", pos)
    return domain.lower()


def _parse_jid_pattern(value: str, pos: int, fieldname: str, *, allow_full: bool) -> JidPattern:
    if value.startswith("*@"):
        return JidPattern(JidKind.DOMAIN, _check_domain(value[2:], pos + 2, fieldname))
    bare, sep, resource = value.partition("/")
    if sep and not allow_full:
        raise QuerySyntaxError(
            f"{fieldname}: takes a bare JID or *@domain, not a full JID with /resource",
            pos + len(bare),
        )
    if sep and not resource:
        raise QuerySyntaxError(f"{fieldname}: empty resource after '/'", pos + len(bare))
    if len(resource) > _MAX_JID_PART:
        raise QuerySyntaxError(f"{fieldname}: the resource is too long", pos + len(bare) + 1)
    local, at, domain = bare.partition("@")
    if not at:
        local, domain = "", bare
    elif not local:
        raise QuerySyntaxError(f"{fieldname}: nothing before '@' (use *@domain for a domain)", pos)
    for i, ch in enumerate(local):
        if ch in _LOCAL_FORBIDDEN or ch == "*":
            hint = " (wildcards are only allowed as *@domain)" if ch == "*" else ""
            raise QuerySyntaxError(
                f"{fieldname}: character {ch!r} is not allowed before '@'{hint}", pos + i
            )
    if len(local) > _MAX_JID_PART:
        raise QuerySyntaxError(f"{fieldname}: the part before '@' is too long", pos)
    domain_pos = pos + len(local) + (1 if at else 0)
    domain = _check_domain(domain, domain_pos, fieldname)
    normal_bare = f"{local.lower()}@{domain}" if at else domain
    if sep:
        return JidPattern(JidKind.FULL, f"{normal_bare}/{resource}")
    return JidPattern(JidKind.BARE, normal_bare)


# --- dates -----------------------------------------------------------------------------

_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATETIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T[0-9:.,+\-Z]+", re.IGNORECASE)


def _parse_time(value: str, pos: int, fieldname: str) -> datetime:
    problem = f"{fieldname}: {value!r} is not a date (YYYY-MM-DD) or ISO date-time"
    try:
        if _DATE_RE.fullmatch(value):
            day = date.fromisoformat(value)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        if _DATETIME_RE.fullmatch(value):
            at = datetime.fromisoformat(value.upper())
            if at.tzinfo is None:
                at = at.replace(tzinfo=UTC)
            return at.astimezone(UTC)
    except (ValueError, OverflowError):
        # Overflow: a time near year 1 or 9999 whose offset pushes it out of range.
        raise QuerySyntaxError(problem, pos) from None
    raise QuerySyntaxError(problem, pos)


# --- the parser ------------------------------------------------------------------------

_FIELDS = ("from", "to", "with", "room", "after", "before", "type", "verdict", "has", "is")


def _keyword(value: str, pos: int, fieldname: str, allowed: tuple[str, ...]) -> str:
    lowered = value.lower()
    if lowered not in allowed:
        raise QuerySyntaxError(
            f"{fieldname}: unknown value {value!r}; expected one of {', '.join(allowed)}", pos
        )
    return lowered


def _field_term(fieldname: str, value: str, pos: int) -> Term:
    if fieldname in ("from", "to", "with"):
        return PartyTerm(
            Party(fieldname), _parse_jid_pattern(value, pos, fieldname, allow_full=True)
        )
    if fieldname == "room":
        return RoomTerm(_parse_jid_pattern(value, pos, fieldname, allow_full=False))
    if fieldname in ("after", "before"):
        return TimeTerm(TimeBound(fieldname), _parse_time(value, pos, fieldname))
    if fieldname == "type":
        return TypeTerm(
            RecordType(_keyword(value, pos, "type", tuple(t.value for t in RecordType)))
        )
    if fieldname == "verdict":
        return VerdictTerm(Action(_keyword(value, pos, "verdict", tuple(a.value for a in Action))))
    flags = _HAS_FLAGS if fieldname == "has" else _IS_FLAGS
    lowered = value.lower()
    other = "is" if fieldname == "has" else "has"
    if lowered in {f.value for f in (_IS_FLAGS if fieldname == "has" else _HAS_FLAGS)}:
        raise QuerySyntaxError(f"{fieldname}:{lowered} does not exist; use {other}:{lowered}", pos)
    return FlagTerm(Flag(_keyword(value, pos, fieldname, tuple(f.value for f in flags))))


def _check_characters(text: str) -> None:
    for i, ch in enumerate(text):
        code = ord(ch)
        if 0xD800 <= code <= 0xDFFF:
            raise QuerySyntaxError("invalid character (unpaired surrogate)", i)
        if unicodedata.category(ch) == "Cc" and not ch.isspace():
            raise QuerySyntaxError(f"control character U+{code:04X} is not allowed", i)


def _read_quoted(text: str, start: int) -> tuple[str, int]:
    """Read `"..."` starting at the opening quote; return the inside and the index after."""
    end = text.find('"', start + 1)
    if end < 0:
        raise QuerySyntaxError("unterminated quote: add the closing '\"'", start)
    return text[start + 1 : end], end + 1


def _read_bare(text: str, start: int, what: str) -> tuple[str, int]:
    """Read up to the next whitespace; a quote inside is a mistake worth pointing out."""
    i = start
    while i < len(text) and not text[i].isspace():
        if text[i] == '"':
            raise QuerySyntaxError(
                f"unexpected '\"' inside {what}; a phrase must start after a space", i
            )
        i += 1
    return text[start:i], i


def _expect_separator(text: str, i: int) -> None:
    if i < len(text) and not text[i].isspace():
        raise QuerySyntaxError("expected a space after the closing quote", i)


def parse_query(text: str) -> Query:
    """Parse an officer's search text; raise `QuerySyntaxError` on anything malformed."""
    if len(text) > MAX_QUERY_LENGTH:
        raise QuerySyntaxError(
            f"query too long ({len(text)} characters; at most {MAX_QUERY_LENGTH})",
            MAX_QUERY_LENGTH,
        )
    _check_characters(text)
    clauses: list[Clause] = []
    n = len(text)
    i = 0
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            break
        start = i
        if len(clauses) >= MAX_TERMS:
            raise QuerySyntaxError(f"too many terms (at most {MAX_TERMS})", start)
        negated = text[i] == "-"
        if negated:
            i += 1
            if i >= n or text[i].isspace():
                raise QuerySyntaxError("'-' must be followed by the term to exclude", start)
            if text[i] == "-":
                raise QuerySyntaxError("a term can be negated only once", i)
        term: Term
        if text[i] == '"':
            quote = i
            phrase, i = _read_quoted(text, i)
            if not phrase.strip():
                raise QuerySyntaxError("empty phrase", quote)
            prefix = i < n and text[i] == "*"
            if prefix:
                i += 1
            _expect_separator(text, i)
            term = TextTerm(phrase, phrase=True, prefix=prefix)
        elif (match := _FIELD_RE.match(text, i)) is not None:
            fieldname = match.group(1).lower()
            if fieldname not in _FIELDS:
                raise QuerySyntaxError(
                    f"unknown field {match.group(1)!r}; known fields are "
                    f"{', '.join(f + ':' for f in _FIELDS)} (put text in quotes to search "
                    "for it literally)",
                    i,
                )
            value_pos = match.end()
            if value_pos < n and text[value_pos] == '"':
                value, i = _read_quoted(text, value_pos)
                value_pos += 1
                _expect_separator(text, i)
            else:
                value, i = _read_bare(text, value_pos, f"the value of {fieldname}:")
            if not value:
                raise QuerySyntaxError(f"{fieldname}: needs a value", value_pos)
            term = _field_term(fieldname, value, value_pos)
        else:
            word, i = _read_bare(text, i, "a word")
            prefix = word.endswith("*")
            if prefix:
                word = word.rstrip("*")  # `deal**` is just `deal*`
                if not any(ch.isalnum() for ch in word):
                    raise QuerySyntaxError("'*' must follow at least one letter or digit", i - 1)
            term = TextTerm(word, prefix=prefix)
        clauses.append(Clause(term, negated, start))
    return Query(tuple(clauses))


def as_query(query: Query | str) -> Query:
    """Accept either form at API boundaries."""
    return query if isinstance(query, Query) else parse_query(query)
