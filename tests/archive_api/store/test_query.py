"""The search language parser: AST shapes, normalisation, error positions, fuzzing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archive_api.store.errors import QuerySyntaxError
from archive_api.store.query import (
    MAX_QUERY_LENGTH,
    MAX_TERMS,
    Clause,
    Flag,
    FlagTerm,
    JidKind,
    JidPattern,
    Party,
    PartyTerm,
    Query,
    RecordType,
    RoomTerm,
    TextTerm,
    TimeBound,
    TimeTerm,
    TypeTerm,
    VerdictTerm,
    as_query,
    jid_domain,
    normalize_jid,
    parse_query,
)
from classifier.verdict import Action


def terms(text: str) -> list[tuple[object, bool]]:
    return [(c.term, c.negated) for c in parse_query(text).clauses]


def test_design_example() -> None:
    text = (
        'from:alice@corp.example to:*@partner.example "guaranteed return" -lunch '
        "after:2026-01-01 before:2026-02-01 verdict:quarantine has:attachment "
        "room:desk@conference.corp.example"
    )
    query = parse_query(text)
    assert query == Query.of(
        PartyTerm(Party.FROM, JidPattern(JidKind.BARE, "alice@corp.example")),
        PartyTerm(Party.TO, JidPattern(JidKind.DOMAIN, "partner.example")),
        TextTerm("guaranteed return", phrase=True),
        Clause(TextTerm("lunch"), negated=True),
        TimeTerm(TimeBound.AFTER, datetime(2026, 1, 1, tzinfo=UTC)),
        TimeTerm(TimeBound.BEFORE, datetime(2026, 2, 1, tzinfo=UTC)),
        VerdictTerm(Action.QUARANTINE),
        FlagTerm(Flag.ATTACHMENT),
        RoomTerm(JidPattern(JidKind.BARE, "desk@conference.corp.example")),
    )
    starts = ["from:", "to:", '"', "-lunch", "after:", "before:", "verdict:", "has:", "room:"]
    assert [c.position for c in query.clauses] == [text.index(s) for s in starts]


def test_empty_and_blank_queries_match_everything() -> None:
    assert parse_query("") == Query()
    assert parse_query(" \t\n ") == Query()


def test_words_prefixes_and_phrases() -> None:
    assert terms("guarant* hello") == [
        (TextTerm("guarant", prefix=True), False),
        (TextTerm("hello"), False),
    ]
    assert terms('"big deal"* -"bad deal" -word*') == [
        (TextTerm("big deal", phrase=True, prefix=True), False),
        (TextTerm("bad deal", phrase=True), True),
        (TextTerm("word", prefix=True), True),
    ]
    # Operators of backends are plain words here.
    assert terms("a OR b NEAR(c)") == [
        (TextTerm("a"), False),
        (TextTerm("OR"), False),
        (TextTerm("b"), False),
        (TextTerm("NEAR(c)"), False),
    ]
    assert terms(":colon x-y 5%") == [
        (TextTerm(":colon"), False),
        (TextTerm("x-y"), False),
        (TextTerm("5%"), False),
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice@corp.example", JidPattern(JidKind.BARE, "alice@corp.example")),
        ("Alice@Corp.Example", JidPattern(JidKind.BARE, "alice@corp.example")),
        ("Alice@Corp.Example/Phone", JidPattern(JidKind.FULL, "alice@corp.example/Phone")),
        ("alice@corp.example/a/b@c", JidPattern(JidKind.FULL, "alice@corp.example/a/b@c")),
        ("*@Partner.Example", JidPattern(JidKind.DOMAIN, "partner.example")),
        ("conference.corp.example", JidPattern(JidKind.BARE, "conference.corp.example")),
        ("corp.example.", JidPattern(JidKind.BARE, "corp.example")),
        ("jürgen@bücher.example", JidPattern(JidKind.BARE, "jürgen@bücher.example")),
    ],
)
def test_jid_values(value: str, expected: JidPattern) -> None:
    for party in Party:
        assert terms(f"{party.value}:{value}") == [(PartyTerm(party, expected), False)]


def test_jid_pattern_helpers() -> None:
    full = JidPattern(JidKind.FULL, "alice@corp.example/phone")
    assert full.bare == "alice@corp.example"
    assert str(JidPattern(JidKind.DOMAIN, "corp.example")) == "*@corp.example"
    assert normalize_jid("Alice@Corp.Example/Phone") == "alice@corp.example/Phone"
    assert jid_domain("Alice@Corp.Example/x@y") == "corp.example"
    assert jid_domain("Corp.Example") == "corp.example"


def test_room_values() -> None:
    assert terms("room:Desk@Conference.Corp.Example") == [
        (RoomTerm(JidPattern(JidKind.BARE, "desk@conference.corp.example")), False)
    ]
    assert terms("-room:*@conference.corp.example") == [
        (RoomTerm(JidPattern(JidKind.DOMAIN, "conference.corp.example")), True)
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-01-31", datetime(2026, 1, 31, tzinfo=UTC)),
        ("2026-01-31T10:20", datetime(2026, 1, 31, 10, 20, tzinfo=UTC)),
        ("2026-01-31T10:20:30Z", datetime(2026, 1, 31, 10, 20, 30, tzinfo=UTC)),
        ("2026-01-31t10:20:30z", datetime(2026, 1, 31, 10, 20, 30, tzinfo=UTC)),
        ("2026-01-31T10:20:30.5+02:00", datetime(2026, 1, 31, 8, 20, 30, 500000, tzinfo=UTC)),
        ("2026-01-01T00:30-01:00", datetime(2026, 1, 1, 1, 30, tzinfo=UTC)),
    ],
)
def test_time_values_are_utc(value: str, expected: datetime) -> None:
    for bound in TimeBound:
        [(term, negated)] = terms(f"{bound.value}:{value}")
        assert term == TimeTerm(bound, expected) and not negated
        assert isinstance(term, TimeTerm) and term.at.utcoffset() == timedelta(0)


def test_keyword_fields() -> None:
    assert terms("type:GroupChat -type:file") == [
        (TypeTerm(RecordType.GROUPCHAT), False),
        (TypeTerm(RecordType.FILE), True),
    ]
    assert [t for t, _ in terms(" ".join(f"type:{t.value}" for t in RecordType))] == [
        TypeTerm(t) for t in RecordType
    ]
    assert [t for t, _ in terms(" ".join(f"verdict:{a.value}" for a in Action))] == [
        VerdictTerm(a) for a in Action
    ]
    assert terms("HAS:Attachment has:encrypted IS:edited is:retracted") == [
        (FlagTerm(Flag.ATTACHMENT), False),
        (FlagTerm(Flag.ENCRYPTED), False),
        (FlagTerm(Flag.EDITED), False),
        (FlagTerm(Flag.RETRACTED), False),
    ]


def test_quoted_field_values() -> None:
    assert terms('from:"alice@corp.example"') == [
        (PartyTerm(Party.FROM, JidPattern(JidKind.BARE, "alice@corp.example")), False)
    ]


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ("from:", 5, "needs a value"),
        ("hello from: alice", 11, "needs a value"),
        ("subject:hello", 0, "unknown field 'subject'"),
        ("http://evil.example/x", 0, "put text in quotes"),
        ('hello "unterminated', 6, "unterminated quote"),
        ('""', 0, "empty phrase"),
        ('a "  "', 2, "empty phrase"),
        ('"a"b', 3, "space after the closing quote"),
        ('say"hi"', 3, "inside a word"),
        ("after:2026-02-30", 6, "not a date"),
        ("before:yesterday", 7, "not a date"),
        ("after:2026-01-01T25:00", 6, "not a date"),
        ("after:9999-12-31T23:00-05:00", 6, "not a date"),
        ("type:fax", 5, "expected one of chat, groupchat"),
        ("verdict:maybe", 8, "expected one of allow, flag"),
        ("has:edited", 4, "use is:edited"),
        ("is:attachment", 3, "use has:attachment"),
        ("has:wings", 4, "expected one of attachment, encrypted"),
        ("-", 0, "must be followed"),
        ("a - b", 2, "must be followed"),
        ("--a", 1, "negated only once"),
        ("*", 0, "'*' must follow"),
        ("x -*", 3, "'*' must follow"),
        ("from:a*@corp.example", 6, "wildcards are only allowed as *@domain"),
        ("from:*@*.example", 7, "wildcards are only allowed as *@domain"),
        ("from:@corp.example", 5, "nothing before '@'"),
        ("from:a@b@corp.example", 8, "not allowed in a domain"),
        ("from:al'ice@corp.example", 7, "not allowed before '@'"),
        ("from:alice@corp..example", 16, "empty label"),
        ("from:alice@", 11, "the domain is empty"),
        ("from:alice@corp.example/", 23, "empty resource"),
        ("room:desk@conference.example/nick", 28, "not a full JID"),
        ("a\x00b", 1, "control character U+0000"),
        ("ok \x7f", 3, "control character U+007F"),
        ("\ud83d", 0, "unpaired surrogate"),
    ],
)
def test_errors_point_at_the_offending_character(text: str, position: int, fragment: str) -> None:
    with pytest.raises(QuerySyntaxError) as caught:
        parse_query(text)
    assert caught.value.position == position
    assert fragment in caught.value.message
    assert f"(at character {position + 1})" in str(caught.value)


def test_length_and_term_limits() -> None:
    parse_query("x" * MAX_QUERY_LENGTH)
    with pytest.raises(QuerySyntaxError, match="too long") as caught:
        parse_query("x" * (MAX_QUERY_LENGTH + 1))
    assert caught.value.position == MAX_QUERY_LENGTH
    parse_query(" ".join(["w"] * MAX_TERMS))
    with pytest.raises(QuerySyntaxError, match="too many terms") as many:
        parse_query(" ".join(["w"] * (MAX_TERMS + 1)))
    assert many.value.position == 2 * MAX_TERMS


def test_jid_parts_have_length_limits() -> None:
    with pytest.raises(QuerySyntaxError, match="too long"):
        parse_query("from:" + "a" * 1024 + "@corp.example")
    with pytest.raises(QuerySyntaxError, match="too long"):
        parse_query("from:alice@" + "a" * 1024)


def test_canonical_text_round_trips() -> None:
    text = (
        'FROM:Alice@Corp.example/Phone to:*@partner.example "guaranteed  return"* -lunch* '
        "after:2026-01-01 before:2026-02-01T10:00+01:00 -verdict:Quarantine has:attachment "
        "-is:edited room:desk@conference.corp.example type:file"
    )
    query = parse_query(text)
    assert str(query) == (
        'from:alice@corp.example/Phone to:*@partner.example "guaranteed  return"* -lunch* '
        "after:2026-01-01 before:2026-02-01T09:00:00+00:00 -verdict:quarantine "
        "has:attachment -is:edited room:desk@conference.corp.example type:file"
    )
    assert parse_query(str(query)) == query
    assert as_query(str(query)) == query and as_query(query) is query


def test_queries_built_in_code_render_safely() -> None:
    query = Query.of(
        TextTerm('say "hi"'),
        TextTerm("from:x"),
        TextTerm("-neg"),
        TextTerm("star*", prefix=True),
        TimeTerm(TimeBound.AFTER, datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))),
    )
    rendered = parse_query(str(query))
    assert [c.term for c in rendered.clauses] == [
        TextTerm("say  hi ", phrase=True),
        TextTerm("from:x", phrase=True),
        TextTerm("-neg", phrase=True),
        TextTerm("star*", phrase=True, prefix=True),
        TimeTerm(TimeBound.AFTER, datetime(2026, 1, 1, tzinfo=UTC)),
    ]
    assert Query.of(TextTerm("x")).text_clauses == (Clause(TextTerm("x")),)
    assert Query.of(FlagTerm(Flag.EDITED)).filter_clauses == (Clause(FlagTerm(Flag.EDITED)),)


# --- fuzzing ------------------------------------------------------------------------------

_PIECES = st.sampled_from(
    [
        "from:",
        "to:",
        "with:",
        "room:",
        "after:",
        "before:",
        "type:",
        "verdict:",
        "has:",
        "is:",
        "FROM:",
        "x:",
        "-",
        "--",
        '"',
        "*",
        "*@",
        "@",
        "/",
        ":",
        " ",
        "\t",
        "2026-01-01",
        "2026-13-45",
        "T10:00",
        "Z",
        "+01:00",
        "alice",
        "corp.example",
        "chat",
        "file",
        "quarantine",
        "attachment",
        "edited",
        "é",
        "😀",
        "\u200b",
        "\x00",
        "\ud800",
        "NEAR(",
        "'; DROP TABLE records; --",
        "%",
        "_",
        "\\",
        ".",
        "..",
    ]
)
_QUERYISH = st.lists(_PIECES | st.text(max_size=5), max_size=30).map("".join)


def _parse_or_syntax_error(text: str) -> Query | None:
    try:
        return parse_query(text)
    except QuerySyntaxError as exc:
        assert 0 <= exc.position <= len(text)
        return None


@settings(max_examples=1500, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_any_text_parses_or_raises_query_syntax_error(text: str) -> None:
    _parse_or_syntax_error(text)


@settings(max_examples=3000, deadline=None)
@given(_QUERYISH)
def test_fuzz_query_like_text_parses_or_raises_query_syntax_error(text: str) -> None:
    query = _parse_or_syntax_error(text)
    if query is not None:
        assert parse_query(str(query)) == query
        assert len(query.clauses) <= MAX_TERMS


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        alphabet=st.characters(codec="utf-8"),
        min_size=MAX_QUERY_LENGTH - 5,
        max_size=MAX_QUERY_LENGTH + 50,
    )
)
def test_fuzz_long_inputs(text: str) -> None:
    _parse_or_syntax_error(text)
