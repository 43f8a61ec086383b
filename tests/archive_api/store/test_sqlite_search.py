"""SQLite search shortcuts give exactly what the plain plans give.

The store picks a join order per query (text first, or a selective filter first), answers
relevance from the few records that can top the page, counts text in the FTS5 index alone
and computes facets in one pass. Each is checked here against the straightforward SQL on a
store big enough for every shortcut to fire, and the tests assert that it did fire.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sqlite3
from collections.abc import AsyncIterator, Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from archive_api.store.base import Facets, SortOrder
from archive_api.store.errors import QuerySyntaxError
from archive_api.store.query import TextTerm, parse_query
from archive_api.store.records import Direction
from archive_api.store.sqlite import (
    _DAY_US,
    SqliteStore,
    _choose_plan,
    _id_slices,
    _instance_probe,
    _max_spill,
    _plan,
    _relevance_shortcut,
    _relevance_sql,
)
from classifier.verdict import Action
from tests.archive_api.store.conformance import HOSTILE_QUERIES, T0, ChainWriter, record

# "deal" is in most records, often more than once; the Greek letters are rarer.
WORDS = (
    *("deal", "deal", "deal", "price", "client", "trade", "market", "lunch", "coffee"),
    *("report", "risk", "order", "alpha", "beta", "gamma", "delta", "epsilon", "zeta"),
    *("eta", "theta", "iota", "kappa", "lambda"),
)
PEOPLE = [f"user{i}@corp.example" for i in range(200)]
PARTNERS = [f"ext{i}@partner{i % 7}.example" for i in range(150)]
RARE = "rare.person@corp.example"  # a handful of messages, several with "deal"
ROOMS = [f"desk{i}@conference.corp.example" for i in range(5)]


def _body(rng: random.Random) -> str | None:
    roll = rng.random()
    if roll < 0.03:
        return None  # subject only: a subject match then scores exactly 2.0
    if roll < 0.05:
        return ""
    if roll < 0.15:  # short lines where two rarer words meet, a few more than once
        lines = ["omega psi"] * 20 + ["omega psi omega", "psi omega psi psi", "psi"]
        return rng.choice(lines)
    count = rng.choice([1, 2, 3, 5, 8, 13, 40, 150])
    words = rng.choices(WORDS, k=count)
    # "sigma" is in about half the records, rarely more than once: the shape of most words.
    sigma = rng.random()
    for _ in range(3 if sigma < 0.02 else 2 if sigma < 0.07 else 1 if sigma < 0.5 else 0):
        words.insert(rng.randint(0, len(words)), "sigma")
    if rng.random() < 0.05:
        words.append(rng.choice(["café", "Zürich", "dealer", "deal-breaker", "DEAL!"]))
    return " ".join(words)


def corpus(count: int = 4000, seed: int = 5) -> list[Any]:
    rng = random.Random(seed)
    records = []
    at = T0
    for n in range(count):
        # Some records share a microsecond; a few arrive late.
        at += timedelta(microseconds=rng.choice([0, 1, 7_000_000, 3_600_000_000]))
        late = at - timedelta(hours=rng.randint(1, 30)) if rng.random() < 0.02 else at
        sender = RARE if n % 400 == 7 else rng.choice(PEOPLE)
        outgoing = rng.random() < 0.6
        other = rng.choice(PARTNERS) if rng.random() < 0.5 else rng.choice(PEOPLE)
        room = rng.choice(ROOMS) if rng.random() < 0.2 else None
        subject = " ".join(rng.choices(WORDS, k=3)) if rng.random() < 0.05 else None
        records.append(
            record(
                f"r{n:05d}",
                at=late,
                sender=sender if outgoing else other,
                recipient=(room or other) if outgoing else sender,
                direction=Direction.FROM_CLIENT if outgoing else Direction.TO_CLIENT,
                stanza_type="groupchat" if room else "chat",
                room=room,
                body=_body(rng),
                subject=subject,
                action=rng.choices(list(Action), weights=[80, 8, 5, 4, 3])[0],
            )
        )
    return records


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the module (the tests only read it)."""
    path = tmp_path_factory.mktemp("search") / "archive.db"

    async def build() -> None:
        store = await SqliteStore.open(path)
        try:
            writer = ChainWriter()
            await store.apply(writer.records(*corpus()))
        finally:
            await store.close()

    asyncio.run(build())
    return path


@pytest.fixture
async def store(archive: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(archive)
    try:
        yield opened
    finally:
        await opened.close()


QUERIES = [
    "sigma",
    "sig*",
    "sigma -lunch",
    "sigma -verdict:allow",
    f"sigma with:{RARE}",
    "deal",
    "deal -lunch",
    "deal price",
    "omega psi",
    "psi -omega",
    '"deal deal"',
    "dea*",
    '"deal pri"*',
    "zeta",
    "café",
    "zurich",
    "deal-breaker",
    f"deal from:{RARE}",
    f"deal with:{RARE}",
    f"deal to:{PEOPLE[3]}",
    "deal with:*@partner3.example",
    "deal from:*@corp.example",
    f"deal room:{ROOMS[1]}",
    "deal verdict:quarantine",
    "deal -verdict:allow",
    "deal after:2026-01-16 before:2026-01-19",
    f"price from:{RARE} after:2026-01-15",
    f"deal from:{RARE}/phone",
    "deal has:attachment",
    "-deal",
    f"from:{RARE}",
    "after:2026-01-16 before:2026-01-17",
    "deal before:2026-01-01",
    "after:2027-01-01",
    "deal after:2026-01-20 before:2026-01-18",
    "",
]


def _ids(conn: sqlite3.Connection, query: str, filter_first: bool, sort: SortOrder) -> list[str]:
    plan = _plan(parse_query(query), _max_spill(conn), filter_first=filter_first)
    direction = "DESC" if sort == "time" else "ASC"
    sql = (
        f"SELECT r.record_id FROM {plan.source} WHERE {plan.where} "  # noqa: S608
        f"ORDER BY {plan.id_col} {direction}"
    )
    return [rid for (rid,) in conn.execute(sql, plan.all_params())]


async def _walk(
    store: SqliteStore, query: str, sort: SortOrder, limit: int, pages: int = 10**6
) -> list[tuple[str, float | None]]:
    """Up to `pages` pages of a search, following the cursor."""
    out: list[tuple[str, float | None]] = []
    cursor = None
    for _ in range(pages):
        page = await store.search(query, limit=limit, cursor=cursor, sort=sort)
        out.extend((hit.record.record_id, hit.score) for hit in page.hits)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    return out


@pytest.mark.parametrize("sort", ["time", "time_asc"])
async def test_both_join_orders_give_the_same_pages(store: SqliteStore, sort: SortOrder) -> None:
    conn = store._conn
    for query in QUERIES:
        text_first = await store._run(_ids, conn, query, False, sort)
        filter_first = await store._run(_ids, conn, query, True, sort)
        assert filter_first == text_first, query
        # Both orders agree, so whichever the store picks, its pages must be these.
        walked = await _walk(store, query, sort, limit=37, pages=3)
        assert [rid for rid, _ in walked] == text_first[: 3 * 37], query
        assert await store.count(query) == len(text_first), query


async def test_the_join_order_follows_the_numbers(store: SqliteStore) -> None:
    def choose(query: str) -> bool:
        return _choose_plan(store._conn, parse_query(query)).filter_first

    # A common word and a person with a handful of messages: walk her messages.
    assert await store._run(choose, f"deal from:{RARE}")
    assert await store._run(choose, f"deal with:{RARE}")
    # A common word and a filter most records pass, or a rare word: walk the text.
    assert not await store._run(choose, "deal from:*@corp.example")
    assert not await store._run(choose, f"zurich from:{RARE}")
    # No text, or no filter an index answers: nothing to choose.
    assert not await store._run(choose, f"from:{RARE}")
    assert not await store._run(choose, "deal has:attachment")


async def test_relevance_shortcut_is_exact(store: SqliteStore) -> None:
    conn = store._conn
    fired = set()
    for query in QUERIES:
        parsed = parse_query(query)
        plan = await store._run(_choose_plan, conn, parsed)
        sql, params = _relevance_sql(plan, None, 100_000)
        full = await store._run(lambda s=sql, p=params: conn.execute(s, p).fetchall())
        expected = [(rid, score if plan.match is not None else 0.0) for _, rid, score in full]
        for limit in (5, 50):
            # The first pages, where the shortcut answers, and wherever the cursor leads.
            walked = await _walk(store, query, "relevance", limit, pages=4)
            assert walked == expected[: len(walked)], (query, limit)
            assert len(walked) == min(len(expected), 4 * limit), (query, limit)
            first = await store._run(_relevance_shortcut, conn, parsed, plan, limit, None)
            if first is not None:
                fired.add(query)
                assert [(rid, score) for _, rid, score in first] == expected[: limit + 1]
    # The shortcut must really have answered the common-word queries.
    assert {"sigma", "sig*", "sigma -lunch", "omega psi"} <= fired


def test_ascii_tokens_are_found_as_fts5_finds_them() -> None:
    """`_instance_probe` relies on unicode61 splitting ASCII like the regex does."""
    conn = sqlite3.connect(":memory:")
    conn.execute(
        "CREATE VIRTUAL TABLE t USING fts5 (x, tokenize = 'unicode61 remove_diacritics 2')"
    )
    conn.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, instance)")
    rng = random.Random(7)
    alphabet = [chr(c) for c in range(1, 128)]
    for n in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        conn.execute("INSERT INTO t (rowid, x) VALUES (?, ?)", (n, text))
        fts_tokens = [
            term
            for (term,) in conn.execute("SELECT term FROM v WHERE doc = ? ORDER BY offset", (n,))
        ]
        probe = _instance_probe(TextTerm(text))
        if not fts_tokens:
            assert probe is None, repr(text)
            continue
        assert probe == ("term = ?", [max(fts_tokens, key=len)]), repr(text)


def test_instance_probe_refuses_what_it_cannot_tokenise_exactly() -> None:
    assert _instance_probe(TextTerm("café")) is None
    assert _instance_probe(TextTerm("---")) is None
    assert _instance_probe(TextTerm("Zoo", prefix=True)) == (
        "term >= ? AND term < ?",
        ["zoo", "zop"],
    )
    assert _instance_probe(TextTerm("ab9", prefix=True)) == (
        "term >= ? AND term < ?",
        ["ab9", "ab:"],
    )
    assert _instance_probe(TextTerm("price z", phrase=True, prefix=True)) == (
        "term = ?",
        ["price"],
    )


def _reference_facets(conn: sqlite3.Connection, query: str, top: int) -> Facets:
    """Facets as three plain GROUP BY queries on the text-first plan."""
    plan = _plan(parse_query(query), _max_spill(conn))
    base = f"FROM {plan.source} WHERE {plan.where}"
    params = plan.all_params()
    by_action = dict(conn.execute(f"SELECT r.action, count(*) {base} GROUP BY 1", params))
    by_domain = conn.execute(
        f"SELECT r.remote_domain, count(*) AS n {base} GROUP BY 1 "
        "ORDER BY n DESC, r.remote_domain LIMIT ?",
        (*params, top),
    ).fetchall()
    day = f"(r.occurred_us - ((r.occurred_us % {_DAY_US}) + {_DAY_US}) % {_DAY_US}) / {_DAY_US}"
    by_day = conn.execute(f"SELECT {day} AS d, count(*) {base} GROUP BY d ORDER BY d", params)
    return Facets(
        by_action=tuple((a, by_action[a.value]) for a in Action if a.value in by_action),
        by_remote_domain=tuple((d, n) for d, n in by_domain),
        by_day=tuple((date(1970, 1, 1) + timedelta(days=d), n) for d, n in by_day),
    )


@pytest.mark.parametrize("top", [1, 3, 20])
async def test_one_pass_facets_equal_group_by_facets(store: SqliteStore, top: int) -> None:
    for query in QUERIES:
        expected = await store._run(_reference_facets, store._conn, query, top)
        assert await store.facets(query, top=top) == expected, query


@pytest.mark.parametrize("slice_records", [1, 97, 1000])
async def test_facets_in_many_slices_add_up(store: SqliteStore, slice_records: int) -> None:
    """The facet pass over id slices (one per record, a few, or one) counts each record once."""
    slices = await store._run(_id_slices, store._conn, parse_query(""), 0, slice_records)
    ids = await store._run(
        lambda: [i for (i,) in store._conn.execute("SELECT id FROM records ORDER BY id")]
    )
    assert slices[0][0] == ids[0] and slices[-1][1] == ids[-1] + 1
    assert all(a[1] == b[0] for a, b in itertools.pairwise(slices))
    if slice_records == 1:
        assert len(slices) == 1000  # the cap
    for query in QUERIES[::3]:
        expected = await store._run(_reference_facets, store._conn, query, 5)
        found = await store._run(store._facets, parse_query(query), 5, slice_records)
        assert found == expected, (query, slice_records)


def _sample_queries() -> Iterator[str]:
    """More shapes, drawn at random, for the facets and counts of both join orders."""
    rng = random.Random(11)
    fields = [
        f"from:{RARE}",
        f"with:{rng.choice(PEOPLE)}",
        "with:*@partner2.example",
        f"room:{ROOMS[0]}",
        "verdict:flag",
        "-verdict:allow",
        "after:2026-01-17",
        "before:2026-01-18",
        "type:groupchat",
    ]
    for _ in range(40):
        words = rng.sample(["deal", "price", "lunch", "-coffee", "zeta", "dea*"], 2)
        yield " ".join([*words, *rng.sample(fields, rng.randint(0, 2))])


async def test_counts_and_facets_agree_for_random_shapes(store: SqliteStore) -> None:
    for query in _sample_queries():
        expected = await store._run(_reference_facets, store._conn, query, 20)
        assert await store.facets(query) == expected, query
        total = sum(n for _, n in expected.by_action)
        assert await store.count(query) == total, query


async def test_hostile_queries_take_the_shortcuts_safely(store: SqliteStore) -> None:
    """Odd text reaches the probes (fts5vocab terms, bounded counts) and changes nothing."""
    conn = store._conn
    for text in [*HOSTILE_QUERIES, "deal NEAR(", 'deal "a""b"*', "deal ' OR 1=1 --", "DEAL z*"]:
        try:
            parsed = parse_query(text)
        except QuerySyntaxError as exc:
            assert 0 <= exc.position <= len(text)
            continue
        for sort in ("time", "relevance"):
            page = await store.search(parsed, sort=sort)
            plan = await store._run(_plan, parsed, 0)
            if sort == "relevance":
                sql, params = _relevance_sql(plan, None, len(page.hits))
            else:
                sql = (
                    f"SELECT {plan.id_col}, r.record_id, NULL FROM {plan.source} "  # noqa: S608
                    f"WHERE {plan.where} ORDER BY {plan.id_col} DESC LIMIT ?"
                )
                params = [*plan.all_params(), len(page.hits) + 1]
            rows = await store._run(lambda s=sql, p=params: conn.execute(s, p).fetchall())
            assert [h.record.record_id for h in page.hits] == [r[1] for r in rows][
                : len(page.hits)
            ], (text, sort)
        assert await store.count(parsed) >= len(page.hits)
        await store.facets(parsed)
