"""The behaviour every `ArchiveStore` backend must show, as one reusable test class.

A backend's test module subclasses `ArchiveStoreConformance` (name it `Test...`) and provides
a `store_factory` fixture: an async callable returning a fresh, empty, open store. The
fixture may be parametrised (several configurations of one backend). Stores the factory
hands out are closed by the suite. Override `settle` if the backend needs a refresh before
what `apply` wrote becomes searchable.

Nothing here knows SQL or Elasticsearch; tamper tests, which must reach around the store,
live in each backend's own module.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta

import pytest

from archive_api.store.base import (
    MAX_LINKED_RECORDS,
    ArchiveStore,
    ChainPosition,
    HoldRecord,
    PurgedRecord,
    RetentionAssignment,
    RetentionState,
    RetentionUpdate,
    SearchPage,
    SortOrder,
    Tombstone,
)
from archive_api.store.chain import GENESIS, ChainLink, CheckpointSigner, link_hash
from archive_api.store.errors import (
    ChainConflict,
    ChainGap,
    InvalidCursor,
    InvalidEntry,
    InvalidRequest,
    NotFound,
    QuerySyntaxError,
    StoreUnavailable,
)
from archive_api.store.query import MAX_QUERY_LENGTH
from archive_api.store.records import (
    ArchiveRecord,
    Attachment,
    AttachmentFetch,
    Direction,
    EntryOp,
    ExchangeDetails,
    FetchStatus,
    Observation,
    ObservationVia,
    RecordKind,
    RecordStatus,
    SpoolEntry,
    canonical_json,
)
from classifier.verdict import Action, Reason, Verdict

StoreFactory = Callable[[], Awaitable[ArchiveStore]]

T0 = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


def record(
    record_id: str,
    *,
    at: datetime = T0,
    sender: str = "alice@corp.example",
    sender_resource: str = "phone",
    recipient: str = "bob@partner.example",
    direction: Direction = Direction.FROM_CLIENT,
    kind: RecordKind = RecordKind.MESSAGE,
    stanza_type: str = "chat",
    body: str | None = "hello",
    subject: str | None = None,
    room: str | None = None,
    action: Action = Action.ALLOW,
    attachments: tuple[Attachment, ...] = (),
    encryption: str | None = None,
    message_id: str | None = None,
    replaces_id: str | None = None,
    retracts_id: str | None = None,
    status: RecordStatus = RecordStatus.DELIVERED,
) -> ArchiveRecord:
    """A record with sensible defaults; one live observation by the sender."""
    sender_full = f"{sender}/{sender_resource}"
    verdict = Verdict(
        action,
        0.9 if action is not Action.ALLOW else 0.0,
        (Reason("test.rule", f"{action.value} in test", 0.5, action),),
    )
    return ArchiveRecord(
        record_id=record_id,
        kind=kind,
        occurred_at=at,
        direction=direction,
        sender=sender,
        sender_full=sender_full,
        recipient=recipient,
        recipient_full=f"{recipient}/desktop",
        stanza_type=stanza_type,
        room=room,
        body=body,
        subject=subject,
        message_id=message_id or f"id-{record_id}",
        origin_id=f"origin-{record_id}",
        attachments=attachments,
        encryption=encryption,
        replaces_id=replaces_id,
        retracts_id=retracts_id,
        verdict=verdict,
        status=status,
        raw=f"<message id='id-{record_id}'/>".encode(),
        observations=(Observation(at, sender_full, ObservationVia.LIVE, direction),),
    )


def observation(
    jid: str, at: datetime = T0, via: ObservationVia = ObservationVia.CARBON_SENT
) -> Observation:
    return Observation(at, jid, via, Direction.TO_CLIENT)


@dataclass
class ChainWriter:
    """Writes spool entries into links the way the spool does (seq from 1, hash-chained)."""

    seq: int = 0
    head: bytes = GENESIS
    links: list[ChainLink] = field(default_factory=list)

    def add(self, *entries: SpoolEntry) -> list[ChainLink]:
        out = []
        for entry in entries:
            self.seq += 1
            payload = entry.payload()
            digest = link_hash(self.head, self.seq, payload)
            link = ChainLink(self.seq, self.head, digest, payload)
            self.head = digest
            out.append(link)
        self.links.extend(out)
        return out

    def records(self, *records: ArchiveRecord) -> list[ChainLink]:
        return self.add(*(rec_entry(r) for r in records))


def rec_entry(rec: ArchiveRecord) -> SpoolEntry:
    return SpoolEntry(EntryOp.RECORD, rec.record_id, record=rec)


def observe_entry(record_id: str, obs: Observation) -> SpoolEntry:
    return SpoolEntry(EntryOp.OBSERVE, record_id, observation=obs)


def status_entry(record_id: str, status: RecordStatus, at: datetime | None = T0) -> SpoolEntry:
    return SpoolEntry(EntryOp.STATUS, record_id, status=status, actor="officer@corp.example", at=at)


UPLOAD_URL = "https://upload.corp.example/f/abc/report.pdf"
SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4


def fetch_ok(
    record_id: str,
    sha256: str = SHA_A,
    size: int = 1234,
    *,
    url: str = UPLOAD_URL,
    attempt: int = 1,
    media_type: str | None = "application/pdf",
    at: datetime | None = T0,
) -> SpoolEntry:
    fetch = AttachmentFetch(url, FetchStatus.OK, attempt, sha256, size, media_type)
    return SpoolEntry(EntryOp.ATTACHMENT, record_id, at=at, fetch=fetch)


def fetch_failed(
    record_id: str,
    error: str = "HTTP 503",
    *,
    url: str = UPLOAD_URL,
    attempt: int = 1,
    at: datetime | None = T0,
) -> SpoolEntry:
    fetch = AttachmentFetch(url, FetchStatus.FAILED, attempt, error=error)
    return SpoolEntry(EntryOp.ATTACHMENT, record_id, at=at, fetch=fetch)


def raw_links(*payloads: bytes) -> list[ChainLink]:
    """Links over payloads as given (for entries the record types cannot express)."""
    out, head = [], GENESIS
    for seq, payload in enumerate(payloads, start=1):
        digest = link_hash(head, seq, payload)
        out.append(ChainLink(seq, head, digest, payload))
        head = digest
    return out


def with_upload(record_id: str, *, media_type: str | None = None) -> ArchiveRecord:
    return record(
        record_id,
        body=UPLOAD_URL,
        attachments=(
            Attachment(UPLOAD_URL, "upload", media_type=media_type),
            Attachment("https://elsewhere.example/x.png", "oob"),
        ),
    )


# --- a corpus that exercises every operator ---------------------------------------------

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
_NOW = T0 + timedelta(days=400)  # retention tests: the purge's "now"
_PAST = _NOW - DAY  # an expiry already reached
_LATER = _NOW + 365 * DAY  # an expiry not reached


def corpus() -> list[ArchiveRecord]:
    pdf = Attachment(
        "https://upload.corp.example/x/report.pdf", "upload", "application/pdf", "report.pdf", 1234
    )
    return [
        record("r01", at=T0, body="Guaranteed return on this deal", message_id="m01"),
        record(
            "r02",
            at=T0 + HOUR,
            sender="bob@partner.example",
            recipient="alice@corp.example",
            direction=Direction.TO_CLIENT,
            body="lunch tomorrow?",
            message_id="m02",
        ),
        record(
            "r03",
            at=T0 + DAY,
            sender="carol@corp.example",
            recipient="dave@other.example",
            body="The café is closed",
            action=Action.FLAG,
            attachments=(pdf,),
        ),
        record(
            "r04",
            at=T0 + 2 * DAY,
            recipient="desk@conference.corp.example",
            stanza_type="groupchat",
            room="desk@conference.corp.example",
            body="guaranteed returns for everyone",
            action=Action.QUARANTINE,
            status=RecordStatus.HELD,
        ),
        record(
            "r05",
            at=T0 + 3 * DAY,
            sender="mallory@spam.example",
            recipient="alice@corp.example",
            direction=Direction.TO_CLIENT,
            body="buy cheap pills now",
            action=Action.REJECT,
            status=RecordStatus.REJECTED,
        ),
        record(
            "r06",
            at=T0 + 3 * DAY + timedelta(seconds=1),
            sender="mallory@spam.example",
            recipient="bob@corp.example",
            direction=Direction.TO_CLIENT,
            body="cheap pills",
            action=Action.DROP,
            status=RecordStatus.DROPPED,
        ),
        record("r07", at=T0 + 4 * DAY, body=None, encryption="omemo"),
        record("r08", at=T0 + 5 * DAY, body="Guaranteed return on this deal!!", replaces_id="m01"),
        record(
            "r09",
            at=T0 + 5 * DAY + HOUR,
            sender="bob@partner.example",
            recipient="alice@corp.example",
            direction=Direction.TO_CLIENT,
            body=None,
            retracts_id="m02",
        ),
        record(
            "r10",
            at=T0 + 6 * DAY,
            kind=RecordKind.SUBSCRIPTION,
            stanza_type="subscribe",
            sender="stranger@far.example",
            recipient="alice@corp.example",
            direction=Direction.TO_CLIENT,
            body=None,
        ),
        record(
            "r11",
            at=T0 + 6 * DAY + HOUR,
            kind=RecordKind.REPORT,
            stanza_type="",
            recipient="corp.example",
            body=None,
        ),
        record(
            "r12",
            at=T0 + 7 * DAY,
            kind=RecordKind.SESSION,
            stanza_type="start",
            sender_resource="laptop",
            recipient="",
            body=None,
        ),
        record(
            "r13",
            at=T0 + 8 * DAY,
            sender="news@corp.example",
            recipient="alice@corp.example",
            stanza_type="headline",
            subject="Market update",
            body="Stocks up",
        ),
        record("r14", at=T0 + 9 * DAY, stanza_type="", body="plain normal message"),
        record("r15", at=T0 + 10 * DAY, sender_resource="laptop", body="from the laptop"),
    ]


ALL = {f"r{i:02d}" for i in range(1, 16)}

# (query, expected record ids)
OPERATOR_CASES: list[tuple[str, set[str]]] = [
    ("", ALL),
    ("guaranteed", {"r01", "r04", "r08"}),
    ("GUARANTEED", {"r01", "r04", "r08"}),
    ('"guaranteed return"', {"r01", "r08"}),
    ("guarant*", {"r01", "r04", "r08"}),
    ('"guaranteed ret"*', {"r01", "r04", "r08"}),
    ("cafe", {"r03"}),
    ("CAFÉ", {"r03"}),
    ("guaranteed -returns", {"r01", "r08"}),
    ("-guaranteed", ALL - {"r01", "r04", "r08"}),
    ('-"guaranteed return"', ALL - {"r01", "r08"}),
    ("market", {"r13"}),  # subject is searched too
    ("cheap pills", {"r05", "r06"}),
    ("cheap -now", {"r06"}),
    ("from:alice@corp.example", {"r01", "r04", "r07", "r08", "r11", "r12", "r14", "r15"}),
    ("from:Alice@CORP.example", {"r01", "r04", "r07", "r08", "r11", "r12", "r14", "r15"}),
    ("from:alice@corp.example/laptop", {"r12", "r15"}),
    ("from:*@spam.example", {"r05", "r06"}),
    ("-from:*@corp.example", {"r02", "r05", "r06", "r09", "r10"}),
    ("to:*@partner.example", {"r01", "r07", "r08", "r14", "r15"}),
    ("to:bob@corp.example", {"r06"}),
    ("with:bob@partner.example", {"r01", "r02", "r07", "r08", "r09", "r14", "r15"}),
    ("with:*@spam.example", {"r05", "r06"}),
    ("room:desk@conference.corp.example", {"r04"}),
    ("room:*@conference.corp.example", {"r04"}),
    ("-room:desk@conference.corp.example", ALL - {"r04"}),
    ("after:2026-01-20", {"r08", "r09", "r10", "r11", "r12", "r13", "r14", "r15"}),
    ("before:2026-01-16", {"r01", "r02"}),
    ("after:2026-01-16 before:2026-01-17", {"r03"}),
    ("after:2026-01-16T12:00:00Z", ALL - {"r01", "r02"}),  # inclusive
    ("before:2026-01-16T12:00:00Z", {"r01", "r02"}),  # exclusive
    ("before:2026-01-16T12:00:00.000001Z", {"r01", "r02", "r03"}),
    ("after:2026-01-16T13:00:00+01:00 before:2026-01-16T13:00:00.000001+01:00", {"r03"}),
    ("-after:2026-01-16", {"r01", "r02"}),
    ("type:chat", {"r01", "r02", "r03", "r05", "r06", "r07", "r08", "r09", "r15"}),
    ("type:groupchat", {"r04"}),
    ("type:normal", {"r14"}),
    ("type:headline", {"r13"}),
    ("type:subscription", {"r10"}),
    ("type:report", {"r11"}),
    ("type:session", {"r12"}),
    ("type:file", {"r03"}),
    ("type:call", set()),
    ("verdict:allow", ALL - {"r03", "r04", "r05", "r06"}),
    ("verdict:flag", {"r03"}),
    ("verdict:quarantine", {"r04"}),
    ("verdict:reject", {"r05"}),
    ("verdict:drop", {"r06"}),
    ("-verdict:allow", {"r03", "r04", "r05", "r06"}),
    ("has:attachment", {"r03"}),
    ("has:encrypted", {"r07"}),
    ("-has:encrypted", ALL - {"r07"}),
    ("is:edited", {"r01", "r08"}),
    ("is:retracted", {"r02", "r09"}),
    ("-is:edited -is:retracted", ALL - {"r01", "r02", "r08", "r09"}),
    (
        'from:alice@corp.example to:*@partner.example "guaranteed return" -lunch '
        "after:2026-01-01 before:2026-02-01 verdict:allow",
        {"r01", "r08"},
    ),
    ("with:alice@corp.example -from:alice@corp.example type:chat", {"r02", "r05", "r09"}),
    ("!!!", set()),  # no letters or digits: matches nothing
    ("-!!!", ALL),
]

HOSTILE_QUERIES = [
    '"',
    '""',
    '" "',
    "*",
    "**",
    "a*",
    "NEAR(",
    "NEAR(a b)",
    '"NEAR(a b, 2)"',
    "a OR b",
    "a AND NOT b",
    "'; DROP TABLE records; --",
    '"\'; DROP TABLE records; --"',
    "body:foo",
    "from:'; DROP TABLE records; --",
    "from:a'b@corp.example",
    "from:*@'; DROP TABLE x",
    "room:%@conference.example",
    "to:_@corp.example",
    "from:*@%",
    "x" * (MAX_QUERY_LENGTH + 1),
    " ".join(["w"] * 60),
    "a\x00b",
    "a\x1bb",
    "\ud800",
    "😀 🏳️‍🌈 \u202eevil\u202c",
    "e\u0301\u0301\u0301",
    "\u200b\u200b",
    "ﷺ ﬀ İstanbul ß",
    "-",
    "--a",
    "- a",
    "-from:",
    "from:",
    "after:2026-02-30",
    "after:9999-12-31T23:59:59-23:59",
    "before:0001-01-01T00:00:00+23:59",
    "after:0001-01-01 before:9999-12-31",
    "type:GROUPCHAT",
    "verdict:maybe",
    "has:everything",
    "is:",
    ":",
    "a:b:c",
    "::",
    "from:alice@corp.example/",
    "from:@corp.example",
    "from:alice@@corp.example",
    "from:alice@corp..example",
    "room:desk@conference.example/nick",
    "\\",
    "%",
    "_",
    "'",
    "`",
    'a"b',
    '"unterminated',
    '"a"b',
    '"a"*',
    '"!!!"*',
    "\t\n\r",
    "é" * 500,
]


def ids(page_or_hits: SearchPage | Iterable[ArchiveRecord]) -> list[str]:
    if isinstance(page_or_hits, SearchPage):
        return [h.record.record_id for h in page_or_hits.hits]
    return [r.record_id for r in page_or_hits]


async def search_all(
    store: ArchiveStore, query: str, *, sort: SortOrder = "time", limit: int = 1000
) -> list[str]:
    out: list[str] = []
    cursor = None
    while True:
        page = await store.search(query, limit=limit, cursor=cursor, sort=sort)
        out.extend(ids(page))
        cursor = page.next_cursor
        if cursor is None:
            return out


class ArchiveStoreConformance:
    """Subclass with a `store_factory` fixture; every test here then runs on that backend."""

    async def settle(self, store: ArchiveStore) -> None:
        """Make applied records visible to search (a refresh, for backends that need one)."""

    @pytest.fixture
    async def store(self, store_factory: StoreFactory) -> AsyncIterator[ArchiveStore]:
        opened = await store_factory()
        try:
            yield opened
        finally:
            await opened.close()

    async def ingest(self, store: ArchiveStore, links: Sequence[ChainLink], **kw: str) -> None:
        await store.apply(links, **kw)
        await self.settle(store)

    @pytest.fixture
    async def loaded(self, store: ArchiveStore) -> ArchiveStore:
        await self.ingest(store, ChainWriter().records(*corpus()))
        return store

    # -- basics --

    async def test_empty_store(self, store: ArchiveStore) -> None:
        assert await store.last_seq() == 0
        assert await store.chains() == ()
        assert await store.get("nope") is None
        page = await store.search("")
        assert page.hits == () and page.next_cursor is None
        assert await store.count("") == 0
        assert [link async for link in store.chain_links()] == []
        report = await store.verify()
        assert report.ok, report.problems

    async def test_apply_then_get_round_trips_the_record(self, store: ArchiveStore) -> None:
        rec = corpus()[2]
        await self.ingest(store, ChainWriter().records(rec))
        assert await store.get(rec.record_id) == rec
        assert await store.last_seq() == 1
        assert await store.chains() == ("spool",)

    async def test_chain_links_give_back_exactly_what_was_applied(
        self, store: ArchiveStore
    ) -> None:
        writer = ChainWriter()
        links = writer.records(*corpus())
        await self.ingest(store, links)
        assert [link async for link in store.chain_links()] == links
        assert [link async for link in store.chain_links(3, 5)] == links[2:5]
        assert [link async for link in store.chain_links(14)] == links[13:]
        assert [link async for link in store.chain_links(chain="other")] == []

    async def test_reapplying_is_a_no_op(self, store: ArchiveStore) -> None:
        writer = ChainWriter()
        first = writer.records(*corpus()[:5])
        await self.ingest(store, first)
        await self.ingest(store, first)
        await self.ingest(store, first[2:4])
        second = writer.records(*corpus()[5:])
        await self.ingest(store, first[3:] + second)  # overlapping batch: only the new part
        assert await store.last_seq() == len(corpus())
        assert await store.count("") == len(corpus())
        assert (await store.verify()).ok

    async def test_a_different_entry_at_an_applied_seq_is_a_conflict(
        self, store: ArchiveStore
    ) -> None:
        await self.ingest(store, ChainWriter().records(*corpus()[:3]))
        forked = ChainWriter().records(*corpus()[:1], record("other"), *corpus()[2:3])
        with pytest.raises(ChainConflict) as caught:
            await store.apply(forked)
        assert caught.value.seq == 2
        assert await store.get("other") is None

    async def test_gap_and_broken_links_are_refused_whole(self, store: ArchiveStore) -> None:
        writer = ChainWriter()
        links = writer.records(*corpus()[:6])
        await self.ingest(store, links[:2])
        with pytest.raises(ChainGap) as gap:
            await store.apply(links[3:])
        assert gap.value.seq == 3
        with pytest.raises(ChainGap):
            await store.apply([links[2], links[4]])  # a hole inside the batch
        bad_prev = replace(links[3], prev_hash=b"\x01" * 32)
        with pytest.raises(ChainConflict) as conflict:
            await store.apply([links[2], bad_prev, links[4]])
        assert conflict.value.seq == 4
        edited = replace(links[3], payload=links[3].payload.replace(b"everyone", b"no one"))
        with pytest.raises(ChainConflict):
            await store.apply([links[2], edited])
        # Nothing of the refused batches landed: not even links[2], which was fine.
        assert await store.last_seq() == 2
        assert await store.get(corpus()[2].record_id) is None
        await self.ingest(store, links[2:])
        assert await store.last_seq() == 6

    async def test_an_unreadable_payload_is_refused(self, store: ArchiveStore) -> None:
        writer = ChainWriter()
        good = writer.records(corpus()[0])
        payload = b'{"op":"record","record_id":"x"}'
        digest = link_hash(writer.head, 2, payload)
        bad = ChainLink(2, writer.head, digest, payload)
        with pytest.raises(InvalidEntry) as caught:
            await store.apply([*good, bad])
        assert caught.value.seq == 2
        assert await store.last_seq() == 0

    async def test_bad_arguments(self, store: ArchiveStore) -> None:
        with pytest.raises(InvalidRequest):
            await store.search("", limit=0)
        with pytest.raises(InvalidRequest):
            await store.search("", sort="random")  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest):
            await store.apply(ChainWriter().records(record("x")), chain="")

    async def test_closed_store_is_unavailable(self, store_factory: StoreFactory) -> None:
        store = await store_factory()
        await store.close()
        await store.close()  # twice is fine
        with pytest.raises(StoreUnavailable):
            await store.get("x")

    # -- observations and status --

    async def test_observations_merge_once(self, store: ArchiveStore) -> None:
        rec = record("r1")
        carbon = observation("alice@corp.example/laptop")
        reflection = observation("bob@partner.example/desktop", via=ObservationVia.MUC_REFLECTION)
        writer = ChainWriter()
        await self.ingest(store, writer.records(rec))
        await self.ingest(
            store, writer.add(observe_entry("r1", carbon), observe_entry("r1", carbon))
        )
        await self.ingest(store, writer.add(observe_entry("r1", reflection)))
        # The same record again (a retry, a second proxy) adds nothing but observations.
        await self.ingest(store, writer.records(replace(rec, observations=(carbon,))))
        got = await store.get("r1")
        assert got is not None
        assert got.observations == (*rec.observations, carbon, reflection)
        assert replace(got, observations=rec.observations) == rec
        assert await store.count("") == 1
        assert (await store.verify()).ok

    async def test_status_changes_latest_wins(self, store: ArchiveStore) -> None:
        rec = record("q1", action=Action.QUARANTINE, status=RecordStatus.HELD)
        writer = ChainWriter()
        await self.ingest(store, writer.records(rec))
        await self.ingest(store, writer.add(status_entry("q1", RecordStatus.RELEASED, T0 + HOUR)))
        got = await store.get("q1")
        assert got is not None and got.status is RecordStatus.RELEASED
        await self.ingest(
            store, writer.add(status_entry("q1", RecordStatus.CONFIRMED_SPAM, T0 + 2 * HOUR))
        )
        got = await store.get("q1")
        assert got is not None and got.status is RecordStatus.CONFIRMED_SPAM
        assert (await store.verify()).ok

    async def test_entries_before_their_record_take_effect_when_it_arrives(
        self, store: ArchiveStore
    ) -> None:
        rec = record("x1", status=RecordStatus.HELD)
        carbon = observation("alice@corp.example/laptop")
        other = ChainWriter()
        await self.ingest(
            store,
            other.add(
                observe_entry("x1", carbon), status_entry("x1", RecordStatus.RELEASED, T0 + HOUR)
            ),
            chain="proxy-b",
        )
        assert await store.get("x1") is None
        assert await store.count("") == 0
        await self.ingest(store, ChainWriter().records(rec), chain="proxy-a")
        got = await store.get("x1")
        assert got is not None
        assert got.status is RecordStatus.RELEASED
        assert set(got.observations) == {*rec.observations, carbon}
        assert await store.last_seq(chain="proxy-a") == 1
        assert await store.last_seq(chain="proxy-b") == 2
        assert await store.chains() == ("proxy-a", "proxy-b")
        assert (await store.verify()).ok

    async def test_status_precedence_is_by_time_across_chains(self, store: ArchiveStore) -> None:
        await self.ingest(store, ChainWriter().records(record("s1")), chain="a")
        late = ChainWriter().add(status_entry("s1", RecordStatus.CONFIRMED_SPAM, T0 + 2 * HOUR))
        early = ChainWriter().add(status_entry("s1", RecordStatus.RELEASED, T0 + HOUR))
        await self.ingest(store, late, chain="b")
        await self.ingest(store, early, chain="c")  # indexed last, happened first
        got = await store.get("s1")
        assert got is not None and got.status is RecordStatus.CONFIRMED_SPAM

    # -- attachment fetches --

    async def test_attachment_fetch_fills_sha256_and_size(self, store: ArchiveStore) -> None:
        rec = with_upload("a1")
        writer = ChainWriter()
        await self.ingest(store, writer.records(rec))
        await self.ingest(store, writer.add(fetch_failed("a1", "timed out", at=T0 + HOUR)))
        assert await store.get("a1") == rec  # a failure changes nothing a reader sees
        ok = writer.add(fetch_ok("a1", attempt=2, at=T0 + 2 * HOUR))
        await self.ingest(store, ok)
        got = await store.get("a1")
        assert got is not None
        upload, other = got.attachments
        assert (upload.sha256, upload.size, upload.media_type) == (SHA_A, 1234, "application/pdf")
        assert (upload.url, upload.source) == (UPLOAD_URL, "upload")
        assert other == rec.attachments[1]  # another URL of the record is untouched
        assert replace(got, attachments=rec.attachments) == rec
        (hit,) = (await store.search("has:attachment")).hits
        assert hit.record == got
        # Re-applying the batch is a no-op.
        await self.ingest(store, ok)
        assert await store.get("a1") == got
        assert await store.last_seq() == 3
        report = await store.verify()
        assert report.ok, report.problems
        assert report.entries_checked == 3

    async def test_attachment_fetch_keeps_the_stated_media_type(self, store: ArchiveStore) -> None:
        writer = ChainWriter()
        await self.ingest(store, writer.records(with_upload("a2", media_type="image/png")))
        await self.ingest(store, writer.add(fetch_ok("a2", media_type="application/octet-stream")))
        got = await store.get("a2")
        assert got is not None and got.attachments[0].media_type == "image/png"
        assert got.attachments[0].sha256 == SHA_A

    async def test_newest_successful_fetch_wins(self, store: ArchiveStore) -> None:
        writer = ChainWriter()
        await self.ingest(store, writer.records(with_upload("a3")))
        await self.ingest(store, writer.add(fetch_ok("a3", SHA_B, 7, at=T0 + 2 * HOUR)))
        # Indexed later but happened earlier; then a later failure: neither replaces it.
        await self.ingest(store, writer.add(fetch_ok("a3", SHA_A, 9, at=T0 + HOUR)))
        await self.ingest(store, writer.add(fetch_failed("a3", at=T0 + 3 * HOUR)))
        got = await store.get("a3")
        assert got is not None and (got.attachments[0].sha256, got.attachments[0].size) == (
            SHA_B,
            7,
        )
        await self.ingest(store, writer.add(fetch_ok("a3", SHA_A, 9, at=T0 + 4 * HOUR)))
        got = await store.get("a3")
        assert got is not None and got.attachments[0].sha256 == SHA_A
        assert (await store.verify()).ok

    async def test_attachment_fetch_before_its_record(self, store: ArchiveStore) -> None:
        stray = fetch_ok("a4", url="https://upload.corp.example/not/in/the/record")
        await self.ingest(store, ChainWriter().add(fetch_ok("a4"), stray), chain="worker")
        assert await store.get("a4") is None
        assert await store.count("") == 0
        await self.ingest(store, ChainWriter().records(with_upload("a4")), chain="proxy")
        got = await store.get("a4")
        assert got is not None
        assert [a.sha256 for a in got.attachments] == [SHA_A, None]
        assert (await store.verify()).ok

    async def test_malformed_attachment_fetches_are_refused(self, store: ArchiveStore) -> None:
        def raw_entry(fetch: dict[str, object]) -> bytes:
            entry = {"op": "attachment", "record_id": "a5", "at": T0.isoformat(), "fetch": fetch}
            return canonical_json(entry)

        good = fetch_ok("a5").fetch
        assert good is not None
        base = good.to_json()
        bad = [
            {**base, "sha256": None},  # ok without a digest
            {**base, "size": None},
            {**base, "sha256": "A" * 64},  # not lower-case hex
            {**base, "sha256": "ab"},
            {**base, "size": -1},
            {**base, "attempt": 0},
            {**base, "attempt": True},
            {**base, "status": "maybe"},
            {**base, "url": ""},
            {k: v for k, v in base.items() if k != "url"},
        ]
        for fetch in bad:
            with pytest.raises(InvalidEntry):
                await self.ingest(store, raw_links(raw_entry(fetch)))
        assert await store.last_seq() == 0

    async def test_call_and_file_steps_are_typed_and_round_trip(self, store: ArchiveStore) -> None:
        """Calls and transfers (proxy/jingle.py): `type:call`, `type:file`; data blocks neither."""

        def step(rid: str, kind: RecordKind, action: str, **kw: object) -> ArchiveRecord:
            details = ExchangeDetails(protocol="jingle", action=action, sid="s1", **kw)  # type: ignore[arg-type]
            base = record(rid, kind=kind, stanza_type=action, body=f"{kind.value} {action}")
            return replace(base, exchange=details, thread="s1")

        offer = Attachment("", "jingle", "application/pdf", "report.pdf", 18, SHA_A)
        call = step("c1", RecordKind.CALL, "session-initiate", media=("audio",))
        ended = step(
            "c2",
            RecordKind.CALL,
            "session-terminate",
            reason="success",
            duration_seconds=61.5,
            started_at=T0,
            accepted_at=T0,
        )
        file = replace(
            step("f1", RecordKind.FILE, "session-initiate", media=("file",)), attachments=(offer,)
        )
        block = step("d1", RecordKind.FILE_DATA, "data", seq=0, data_size=3, data_archived=True)
        await self.ingest(store, ChainWriter().records(call, ended, file, block))
        assert await store.get("c2") == ended and await store.get("f1") == file
        assert {h.record.record_id for h in (await store.search("type:call")).hits} == {"c1", "c2"}
        assert {h.record.record_id for h in (await store.search("type:file")).hits} == {"f1"}
        assert {h.record.record_id for h in (await store.search("-type:call -type:file")).hits} == {
            "d1"
        }
        assert (await store.verify()).ok

    # -- search --

    @pytest.mark.parametrize(
        ("query", "expected"), OPERATOR_CASES, ids=[q or "<empty>" for q, _ in OPERATOR_CASES]
    )
    async def test_operator(self, loaded: ArchiveStore, query: str, expected: set[str]) -> None:
        found = await search_all(loaded, query)
        assert sorted(found) == sorted(expected)
        assert len(found) == len(set(found))
        assert await loaded.count(query) == len(expected)

    async def test_sort_orders(self, loaded: ArchiveStore) -> None:
        newest_first = [f"r{i:02d}" for i in range(15, 0, -1)]
        assert await search_all(loaded, "") == newest_first
        assert await search_all(loaded, "", sort="time_asc") == newest_first[::-1]
        assert await search_all(loaded, "", sort="relevance") == newest_first
        ranked = await loaded.search("guaranteed deal", sort="relevance")
        assert {h.record.record_id for h in ranked.hits} == {"r01", "r08"}
        assert all(h.score is not None and h.score > 0 for h in ranked.hits)
        scores = [h.score for h in ranked.hits]
        assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]
        assert all(h.score is None for h in (await loaded.search("guaranteed")).hits)

    async def test_snippets_mark_matches(self, loaded: ArchiveStore) -> None:
        page = await loaded.search('"guaranteed return"', sort="time_asc")
        first = page.hits[0]
        assert first.record.record_id == "r01"
        marked = [p.text for p in first.snippet if p.match]
        assert [t.lower() for t in marked] == ["guaranteed return"]
        assert "".join(p.text for p in first.snippet) == "Guaranteed return on this deal"
        cafe = (await loaded.search("cafe")).hits[0]
        assert [p.text for p in cafe.snippet if p.match] == ["café"]
        plain = (await loaded.search("from:*@spam.example")).hits
        assert {"".join(p.text for p in h.snippet) for h in plain} == {
            "buy cheap pills now",
            "cheap pills",
        }
        assert not any(p.match for h in plain for p in h.snippet)
        subject = (await loaded.search("market")).hits[0]
        assert any(p.match and p.text == "Market" for p in subject.snippet)

    async def test_hits_carry_full_records(self, loaded: ArchiveStore) -> None:
        expected = {r.record_id: r for r in corpus()}
        for hit in (await loaded.search("", limit=100)).hits:
            assert hit.record == expected[hit.record.record_id]

    @pytest.mark.parametrize("sort", ["time", "time_asc", "relevance"])
    async def test_paging_is_complete_and_stable_under_inserts(
        self, store: ArchiveStore, sort: SortOrder
    ) -> None:
        writer = ChainWriter()
        originals = [
            record(
                f"p{i:03d}",
                at=T0 + i * timedelta(minutes=7),
                body=" ".join(["deal"] * (1 + i % 4) + ["filler"] * (i % 5)),
            )
            for i in range(40)
        ]
        await self.ingest(store, writer.records(*originals))
        query = "deal"
        unpaged = await search_all(store, query, sort=sort)
        assert sorted(unpaged) == sorted(r.record_id for r in originals)
        seen: list[str] = []
        page = await store.search(query, limit=6, sort=sort)
        seen.extend(ids(page))
        rng = random.Random(7)
        n = 0
        while page.next_cursor is not None:
            # Insert newer, older and in-between records (some with the same text) meanwhile.
            extra = [
                record(
                    f"n{n}-{k}",
                    at=T0 + timedelta(minutes=rng.randrange(-60, 400)),
                    body="deal " * rng.randrange(1, 6),
                )
                for k in range(3)
            ]
            n += 1
            await self.ingest(store, writer.records(*extra))
            page = await store.search(query, limit=6, sort=sort, cursor=page.next_cursor)
            seen.extend(ids(page))
        assert len(seen) == len(set(seen)), "a record was returned twice"
        assert {r.record_id for r in originals} <= set(seen), "a record was skipped"
        if sort != "relevance":
            first = [rid for rid in seen if rid.startswith("p")]
            assert first == [rid for rid in unpaged if rid.startswith("p")]

    async def test_cursor_belongs_to_its_query(self, loaded: ArchiveStore) -> None:
        page = await loaded.search("", limit=2)
        assert page.next_cursor is not None
        with pytest.raises(InvalidCursor):
            await loaded.search("guaranteed", limit=2, cursor=page.next_cursor)
        with pytest.raises(InvalidCursor):
            await loaded.search("", limit=2, cursor=page.next_cursor, sort="time_asc")
        for junk in ("", "garbage", "!!!!", "eyJ4IjoxfQ", "W10", "WzEsIngiLDEsbnVsbF0"):
            with pytest.raises(InvalidCursor):
                await loaded.search("", cursor=junk)

    async def test_facets(self, loaded: ArchiveStore) -> None:
        facets = await loaded.facets("")
        assert dict(facets.by_action) == {
            Action.ALLOW: 11,
            Action.FLAG: 1,
            Action.QUARANTINE: 1,
            Action.REJECT: 1,
            Action.DROP: 1,
        }
        assert [a for a, _ in facets.by_action] == list(Action)
        domains = dict(facets.by_remote_domain)
        assert domains["partner.example"] == 7
        assert domains["spam.example"] == 2
        assert sum(n for _, n in facets.by_day) == 15
        assert facets.by_day[0] == (T0.date(), 2)
        assert [d for d, _ in facets.by_day] == sorted(d for d, _ in facets.by_day)
        narrow = await loaded.facets("cheap")
        assert dict(narrow.by_action) == {Action.REJECT: 1, Action.DROP: 1}
        assert narrow.by_remote_domain == (("spam.example", 2),)
        top1 = await loaded.facets("", top=1)
        assert top1.by_remote_domain == (("partner.example", 7),)

    async def test_hostile_queries_fail_cleanly_or_search(self, loaded: ArchiveStore) -> None:
        for query in HOSTILE_QUERIES:
            try:
                await loaded.search(query)
                await loaded.count(query)
                await loaded.facets(query)
            except QuerySyntaxError as exc:
                assert 0 <= exc.position <= len(query)
        rng = random.Random(1234)
        alphabet = [
            '"',
            "*",
            "-",
            ":",
            "(",
            ")",
            "'",
            ";",
            " ",
            "a",
            "é",
            "@",
            "/",
            "NEAR",
            "from",
            "to",
            "with",
            "room",
            "after",
            "2026-01-01",
            "type",
            "chat",
            "\\",
            "%",
            "_",
            "OR",
            "AND",
            "NOT",
            "^",
            "+",
            "{",
            "}",
            "\x00",
            "\u200b",
            "😀",
        ]
        for _ in range(300):
            query = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 20)))
            with contextlib.suppress(QuerySyntaxError):
                await loaded.search(query, limit=5)
        assert await loaded.count("") == 15
        assert (await loaded.verify()).ok

    async def test_bodies_full_of_syntax_are_just_text(self, store: ArchiveStore) -> None:
        nasty = [
            "'; DROP TABLE records; --",
            'NEAR("a" "b", 3) OR x*',
            'she said "hi" AND left',
            "100% _wild_ \\ card",
            "😀 emoji and \u202eright-to-left\u202c",
        ]
        writer = ChainWriter()
        await self.ingest(
            store,
            writer.records(
                *(record(f"z{i}", at=T0 + i * HOUR, body=b) for i, b in enumerate(nasty))
            ),
        )
        assert await search_all(store, '"DROP TABLE records"') == ["z0"]
        assert await search_all(store, "near") == ["z1"]
        assert await search_all(store, '"she said hi"') == ["z2"]
        assert await search_all(store, "wild") == ["z3"]
        assert await search_all(store, "emoji") == ["z4"]
        assert await store.count("") == len(nasty)
        assert (await store.verify()).ok

    # -- checkpoints and verify --

    async def test_checkpoints_are_kept_and_verified(self, store: ArchiveStore) -> None:
        signer = CheckpointSigner.generate()
        writer = ChainWriter()
        await self.ingest(store, writer.records(*corpus()[:5]))
        checkpoint = signer.sign("spool", 5, writer.head)
        await store.add_checkpoint(checkpoint)
        await store.add_checkpoint(checkpoint)
        assert await store.checkpoints() == (checkpoint,)
        assert await store.checkpoints("spool") == (checkpoint,)
        assert await store.checkpoints("other") == ()
        report = await store.verify(public_key=signer.public_key)
        assert report.ok, report.problems
        assert report.chains[0].last_seq == 5 and report.chains[0].head == writer.head
        assert report.chains[0].checkpoints == 1
        assert report.entries_checked == 5 and report.records_checked == 5

        with pytest.raises(ChainConflict):
            await store.add_checkpoint(signer.sign("spool", 3, b"\x00" * 32))

        # A checkpoint past the end (signed by the spool before indexing caught up) is
        # accepted; until the chain reaches it, verify says the store is short.
        ahead = signer.sign("spool", 9, b"\x07" * 32)
        await store.add_checkpoint(ahead)
        report = await store.verify(public_key=signer.public_key)
        assert not report.ok
        assert report.first_break is not None and report.first_break.seq == 9

    async def test_verify_reports_a_forged_signature(self, store: ArchiveStore) -> None:
        signer, impostor = CheckpointSigner.generate(), CheckpointSigner.generate()
        writer = ChainWriter()
        await self.ingest(store, writer.records(*corpus()[:3]))
        await store.add_checkpoint(impostor.sign("spool", 3, writer.head))
        assert (await store.verify()).ok  # without a key only the hashes are checked
        report = await store.verify(public_key=signer.public_key)
        assert [(p.chain, p.seq) for p in report.problems] == [("spool", 3)]
        assert "signature" in report.problems[0].problem

    # -- holds, retention and purge (docs/retention.md) --

    @staticmethod
    def hold(hold_id: str, query: str) -> HoldRecord:
        return HoldRecord(hold_id, "Case", "officer@corp.example", T0, '{"kind":"search"}', query)

    @staticmethod
    async def expire(store: ArchiveStore, *record_ids: str, at: datetime = _PAST) -> None:
        await store.set_retention(
            [RetentionAssignment(rid, "short", at) for rid in record_ids], assigned_at=T0
        )

    @pytest.fixture
    async def observed(self, loaded: ArchiveStore) -> ArchiveStore:
        """The corpus (seq 1..15), an OBSERVE (16) of r01 and a STATUS (17) of r04."""
        writer = ChainWriter()
        writer.records(*corpus())
        await self.ingest(
            loaded,
            writer.add(
                observe_entry("r01", observation("alice@corp.example/laptop")),
                status_entry("r04", RecordStatus.RELEASED, T0 + 3 * DAY),
            ),
        )
        return loaded

    async def test_retention_is_extend_only_and_skips_unknown_ids(
        self, loaded: ArchiveStore
    ) -> None:
        six, three, seven = T0 + 6 * 365 * DAY, T0 + 3 * 365 * DAY, T0 + 7 * 365 * DAY
        first = await loaded.set_retention(
            [RetentionAssignment("r01", "broker", six)], assigned_at=T0
        )
        assert first == RetentionUpdate(assigned=1)
        shorter = await loaded.set_retention(
            [RetentionAssignment("r01", "standard", three)], assigned_at=T0 + DAY
        )
        assert shorter == RetentionUpdate(kept=1)
        state = await loaded.retention_of("r01")
        assert state is not None
        assert (state.retention_class, state.expires_at, state.assigned_at) == ("broker", six, T0)
        longer = await loaded.set_retention(
            [
                RetentionAssignment("r01", "swaps", seven),
                RetentionAssignment("r02", "late", _LATER),
                RetentionAssignment("r02", "early", _PAST),
                RetentionAssignment("no-such-record", "x", _LATER),
            ],
            assigned_at=T0 + 2 * DAY,
        )
        assert longer == RetentionUpdate(assigned=1, extended=1, unknown=1)
        state = await loaded.retention_of("r01")
        assert state is not None and (state.retention_class, state.expires_at) == ("swaps", seven)
        state = await loaded.retention_of("r02")
        assert state is not None and state.retention_class == "late"
        assert await loaded.retention_of("no-such-record") is None
        assert await loaded.set_retention([], assigned_at=T0) == RetentionUpdate()
        with pytest.raises(InvalidRequest):
            await loaded.set_retention([RetentionAssignment("r02", "", _LATER)], assigned_at=T0)

    async def test_retention_subjects_page_and_filter(self, loaded: ArchiveStore) -> None:
        await self.expire(loaded, "r01", "r02")
        await loaded.set_retention([RetentionAssignment("r03", "long", _LATER)], assigned_at=T0)
        seen: list[str] = []
        cursor: str | None = None
        while True:
            page = await loaded.retention_subjects(cursor=cursor, limit=4)
            seen.extend(s.record_id for s in page.subjects)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert sorted(seen) == [f"r{i:02d}" for i in range(1, 16)]  # each once
        unassigned = await loaded.retention_subjects(unassigned_only=True)
        assert {s.record_id for s in unassigned.subjects} == {f"r{i:02d}" for i in range(4, 16)}
        due = await loaded.retention_subjects(expiring_by=_NOW)
        assert sorted(s.record_id for s in due.subjects) == ["r01", "r02"]
        assert all(s.retention_class == "short" and s.expires_at == _PAST for s in due.subjects)
        [r04] = [s for s in (await loaded.retention_subjects()).subjects if s.record_id == "r04"]
        assert (r04.record_type, r04.room) == ("groupchat", "desk@conference.corp.example")
        for bad in ("zz", "1" * 40, "!!", "x" * 5000):
            with pytest.raises(InvalidCursor):
                await loaded.retention_subjects(cursor=bad)
        with pytest.raises(InvalidRequest):
            await loaded.retention_subjects(unassigned_only=True, expiring_by=_NOW)
        with pytest.raises(InvalidRequest):
            await loaded.retention_subjects(limit=0)

    async def test_purge_takes_only_expired_records(self, loaded: ArchiveStore) -> None:
        await self.expire(loaded, "r02", "r03")
        await self.expire(loaded, "r05", at=_LATER)
        dry = await loaded.purge(_NOW, dry_run=True, counts=True)
        assert ({p.record_id for p in dry.purged}, dry.due, dry.held_back) == (
            {"r02", "r03"},
            2,
            0,
        )
        assert (await loaded.purge(_NOW, dry_run=True)).due is None  # counted only when asked
        assert all(p.entries == 0 for p in dry.purged)
        assert await loaded.get("r02") is not None  # a dry run changes nothing
        batch = await loaded.purge(_NOW)
        assert {p.record_id: p.entries for p in batch.purged} == {"r02": 1, "r03": 1}
        assert not batch.more
        assert await loaded.get("r02") is None and await loaded.get("r03") is None
        assert await loaded.get("r05") is not None and await loaded.get("r01") is not None
        assert await loaded.count("cafe") == 0 and await loaded.count("") == 13
        state = await loaded.retention_of("r02")
        assert state is not None and state.purged_at == _NOW
        assert (await loaded.purge(_NOW)).purged == ()  # nothing left to do
        report = await loaded.verify()
        assert report.ok, report.problems

    async def test_purge_in_batches_and_of_planned_ids(self, loaded: ArchiveStore) -> None:
        await self.expire(loaded, *(f"r{i:02d}" for i in range(1, 11)), at=_NOW)
        planned = await loaded.purge(_NOW, record_ids=["r02", "r14", "nope"])
        assert [p.record_id for p in planned.purged] == ["r02"]  # r14 has not expired
        first = await loaded.purge(_NOW, limit=4, counts=True)
        assert len(first.purged) == 4 and first.due == 9 and first.more
        rest: list[PurgedRecord] = []
        while True:
            batch = await loaded.purge(_NOW, limit=4)
            rest.extend(batch.purged)
            if not batch.more:
                break
        assert len(rest) == 5
        assert sorted(await search_all(loaded, "")) == ["r11", "r12", "r13", "r14", "r15"]
        assert (await loaded.verify()).ok
        with pytest.raises(InvalidRequest):
            await loaded.purge(_NOW, limit=2, record_ids=["a", "b", "c"])
        with pytest.raises(InvalidRequest):
            await loaded.purge(_NOW, limit=0)

    async def test_every_entry_of_a_purged_record_becomes_a_tombstone(
        self, observed: ArchiveStore
    ) -> None:
        before = [link async for link in observed.chain_links()]
        await self.expire(observed, "r01", "r04")
        batch = await observed.purge(_NOW)
        # r01: its RECORD (1) and the OBSERVE (16); r04: its RECORD (4) and the STATUS (17).
        assert {p.record_id: p.entries for p in batch.purged} == {"r01": 2, "r04": 2}
        after = {link.seq: link async for link in observed.chain_links()}
        for seq, rid in ((1, "r01"), (16, "r01"), (4, "r04"), (17, "r04")):
            tombstone = Tombstone.from_payload(after[seq].payload)
            assert tombstone is not None and tombstone.record_id == rid
            assert tombstone.purged_at == _NOW and tombstone.expires_at == _PAST
            old = before[seq - 1]
            assert (after[seq].hash, after[seq].prev_hash) == (old.hash, old.prev_hash)
        assert after[2].payload == before[1].payload  # neighbours untouched
        assert "r01" not in await search_all(observed, "guaranteed")
        report = await observed.verify()
        assert report.ok, report.problems
        assert report.entries_checked == 17

    async def test_purged_entries_move_to_another_store_with_their_purge(
        self, observed: ArchiveStore, store_factory: StoreFactory
    ) -> None:
        await self.expire(observed, "r01", "r04")
        await observed.purge(_NOW)
        links = [link async for link in observed.chain_links()]
        states = [await observed.retention_of(rid) for rid in ("r01", "r04")]
        assert all(state is not None and state.purged_at == _NOW for state in states)
        purges = [state for state in states if state is not None]
        target = await store_factory()
        try:
            with pytest.raises(ChainConflict):  # a tombstone never hashes: not from a spool
                await target.apply(links)
            with pytest.raises(InvalidEntry):  # moved, but no purge recorded here for it
                await target.apply(links, tombstones=True)
            assert await target.last_seq() == 0
            assert await target.import_purges(purges) == 2
            assert await target.import_purges(purges) == 0  # the same purges again: nothing
            await target.apply(links[:10], tombstones=True)
            await target.apply(links[10:], tombstones=True)  # more batches, same purges
            await self.settle(target)
            report = await target.verify()
            assert report.ok, report.problems
            assert report.entries_checked == 17
            assert await target.get("r01") is None and await target.get("r04") is None
            assert await target.count("") == await observed.count("")
            for rid, state in zip(("r01", "r04"), states, strict=True):
                assert await target.retention_of(rid) == state
            # A forged tombstone (another class) is refused even with the flag.
            forged = Tombstone("r02", _NOW, "short", _PAST).payload()
            with pytest.raises((InvalidEntry, ChainConflict)):
                await target.apply(
                    [ChainLink(18, links[-1].hash, link_hash(links[-1].hash, 18, forged), forged)],
                    tombstones=True,
                )
            with pytest.raises(InvalidRequest):  # a different purge of the same record
                await target.import_purges([replace(purges[0], retention_class="other")])
            with pytest.raises(InvalidRequest):  # the target holds r02: it was not purged
                await target.import_purges([RetentionState("r02", "short", _PAST, T0, _NOW)])
            with pytest.raises(InvalidRequest):  # not a purge at all
                await target.import_purges([RetentionState("zz", "short", _PAST, T0)])
            assert await target.get("r02") is not None
        finally:
            await target.close()

    async def test_purged_records_never_come_back(self, store: ArchiveStore) -> None:
        signer = CheckpointSigner.generate()
        writer = ChainWriter()
        links = writer.records(record("gone", body="secret plan"), record("kept"))
        await self.ingest(store, links)
        await store.add_checkpoint(signer.sign("spool", 1, links[0].hash))
        await self.expire(store, "gone")
        await store.purge(_NOW)
        await self.ingest(store, links)  # the indexer retrying an old batch: a no-op
        other = ChainWriter()  # another proxy's chain replays the record and observes it
        await self.ingest(
            store,
            other.add(
                rec_entry(record("gone", body="secret plan")),
                observe_entry("gone", observation("bob@partner.example/tablet")),
                status_entry("gone", RecordStatus.RELEASED),
                rec_entry(record("fresh")),
            ),
            chain="proxy-2",
        )
        assert await store.get("gone") is None
        assert await store.count("secret") == 0
        assert await store.get("fresh") is not None
        payloads = [link.payload async for link in store.chain_links(chain="proxy-2")]
        assert [Tombstone.from_payload(p) is not None for p in payloads] == [
            True,
            True,
            True,
            False,
        ]
        report = await store.verify(public_key=signer.public_key)
        assert report.ok, report.problems  # a checkpoint on a tombstone still verifies

    async def test_a_hold_keeps_expired_records(self, loaded: ArchiveStore) -> None:
        await self.expire(loaded, *(f"r{i:02d}" for i in range(1, 16)))
        await loaded.add_hold(self.hold("h1", "from:*@spam.example"))
        await loaded.add_hold(self.hold("h2", '"guaranteed return"'))  # a full-text hold
        batch = await loaded.purge(_NOW, counts=True)
        kept = {"r05", "r06", "r01", "r08"}
        assert {p.record_id for p in batch.purged} == {f"r{i:02d}" for i in range(1, 16)} - kept
        assert batch.held_back == 4
        assert sorted(await search_all(loaded, "")) == sorted(kept)
        released = await loaded.release_hold(
            "h1", released_by="admin@corp.example", released_at=_NOW, reason="case closed"
        )
        assert not released.active and released.release_reason == "case closed"
        assert await loaded.get_hold("h1") == released
        assert [h.hold_id for h in await loaded.list_holds(include_released=False)] == ["h2"]
        assert [h.hold_id for h in await loaded.list_holds()] == ["h1", "h2"]
        second = await loaded.purge(_NOW)
        assert {p.record_id for p in second.purged} == {"r05", "r06"}
        assert (await loaded.verify()).ok

    async def test_holds_covering_names_each_records_holds(self, loaded: ArchiveStore) -> None:
        await loaded.add_hold(self.hold("h1", "with:bob@partner.example"))
        await loaded.add_hold(self.hold("h2", "-verdict:allow"))
        covering = await loaded.holds_covering(["r01", "r03", "r05", "r13", "nope", "' OR 1=1"])
        assert covering == {"r01": ("h1",), "r03": ("h2",), "r05": ("h2",)}
        assert await loaded.holds_covering([]) == {}

    async def test_bad_holds_are_refused(self, loaded: ArchiveStore) -> None:
        await loaded.add_hold(self.hold("h1", "from:alice@corp.example"))
        with pytest.raises(InvalidRequest, match="exists already"):
            await loaded.add_hold(self.hold("h1", "lunch"))
        with pytest.raises(InvalidRequest):  # QuerySyntaxError is an InvalidRequest
            await loaded.add_hold(self.hold("h2", "from:"))
        with pytest.raises(InvalidRequest):
            await loaded.add_hold(self.hold("", "lunch"))
        with pytest.raises(InvalidRequest):
            await loaded.add_hold(replace(self.hold("h4", "lunch"), case_name="c" * 10_001))
        with pytest.raises(InvalidRequest):
            await loaded.add_hold(
                HoldRecord("h3", "C", "o", T0, "{}", "lunch", released_at=T0, released_by="x")
            )
        assert [h.hold_id for h in await loaded.list_holds()] == ["h1"]
        assert await loaded.get_hold("nope") is None
        with pytest.raises(NotFound):
            await loaded.release_hold("nope", released_by="x", released_at=_NOW)
        await loaded.release_hold("h1", released_by="x", released_at=_NOW)
        with pytest.raises(InvalidRequest, match="released already"):
            await loaded.release_hold("h1", released_by="x", released_at=_NOW)
        with pytest.raises(InvalidRequest):
            await loaded.release_hold("h1", released_by="", released_at=_NOW)

    # -- the API's views: positions, edit histories, dashboard activity --

    async def test_record_position_names_chain_and_seq(self, store: ArchiveStore) -> None:
        spool, other = ChainWriter(), ChainWriter()
        await self.ingest(store, spool.records(record("a"), record("b", at=T0 + HOUR)))
        await self.ingest(store, spool.add(observe_entry("a", observation("bob@x.example/x"))))
        await self.ingest(store, other.records(record("c")), chain="proxy-2")
        assert await store.record_position("b") == ChainPosition("spool", 2)
        assert await store.record_position("c") == ChainPosition("proxy-2", 1)
        assert await store.record_position("nope") is None
        assert await store.record_position("' OR 1=1 --") is None

    async def test_linked_records_give_the_whole_history_either_way(
        self, store: ArchiveStore
    ) -> None:
        def minutes(n: int) -> datetime:
            return T0 + timedelta(minutes=n)

        original = record("orig", message_id="m1")
        fix1 = record("fix1", at=minutes(1), replaces_id="m1")
        fix2 = record("fix2", at=minutes(2), replaces_id="origin-orig")  # by origin id
        gone = record("gone", at=minutes(3), retracts_id="m1", body=None)
        # Same message id from someone else: not part of alice's history.
        stranger = record("other", at=minutes(4), sender="mallory@bad.example", replaces_id="m1")
        plain = record("plain", at=minutes(5))
        await self.ingest(store, ChainWriter().records(original, fix1, fix2, gone, stranger, plain))
        linked = await store.linked_records(["orig", "fix1", "gone", "plain", "other", "nope"])
        assert [r.record_id for r in linked["orig"]] == ["fix1", "fix2", "gone"]
        assert [r.record_id for r in linked["fix1"]] == ["orig", "fix2", "gone"]
        assert [r.record_id for r in linked["gone"]] == ["orig", "fix1", "fix2"]
        assert "plain" not in linked and "nope" not in linked
        assert "other" not in linked  # its "original" is not from its sender
        assert linked["orig"][0].body == "hello"  # full records, with their content

    async def test_linked_records_are_bounded(self, store: ArchiveStore) -> None:
        fixes = [
            record(f"fix{n}", at=T0 + timedelta(minutes=n + 1), replaces_id="m1")
            for n in range(MAX_LINKED_RECORDS + 5)
        ]
        await self.ingest(store, ChainWriter().records(record("orig", message_id="m1"), *fixes))
        linked = await store.linked_records(["orig"])
        assert len(linked["orig"]) == MAX_LINKED_RECORDS
        with pytest.raises(InvalidRequest):
            await store.linked_records([f"id{n}" for n in range(1001)])
        assert await store.linked_records([]) == {}

    async def test_activity_counts_days_blocked_domains_and_rules(
        self, store: ArchiveStore
    ) -> None:
        def judged(
            rid: str, at: datetime, action: Action, *rules: str, sender: str
        ) -> ArchiveRecord:
            reasons = tuple(Reason(rule, "x", 1.0, action) for rule in rules)
            incoming = record(
                rid,
                at=at,
                sender=sender,
                recipient="alice@corp.example",
                direction=Direction.TO_CLIENT,
            )
            return replace(incoming, verdict=Verdict(action, 1.0, reasons))

        day1 = datetime(2026, 3, 1, 10, tzinfo=UTC)
        day2 = day1 + timedelta(days=1)
        records = [
            record("ok1", at=day1),
            record("ok2", at=day2),
            judged("rej1", day1, Action.REJECT, "federation", sender="a@bad.example"),
            judged("rej2", day2, Action.REJECT, "federation", "model", sender="b@bad.example"),
            judged("drop", day2, Action.DROP, "blocklist", sender="c@worse.example"),
            judged("held", day2, Action.QUARANTINE, "model", sender="d@worse.example"),
            judged("later", day2 + timedelta(days=5), Action.REJECT, "x", sender="e@late.example"),
        ]
        await self.ingest(store, ChainWriter().records(*records))
        since = datetime(2026, 3, 1, tzinfo=UTC)
        activity = await store.activity(since, since + timedelta(days=2), top=5)
        assert [(d.day, d.total) for d in activity.days] == [
            (date(2026, 3, 1), 2),
            (date(2026, 3, 2), 4),
        ]
        assert dict(activity.days[1].by_action) == {
            Action.ALLOW: 1,
            Action.QUARANTINE: 1,
            Action.REJECT: 1,
            Action.DROP: 1,
        }
        assert activity.blocked_domains == (("bad.example", 2), ("worse.example", 1))
        assert activity.rules == (("federation", 2), ("model", 2), ("blocklist", 1))
        one = await store.activity(since, since + timedelta(days=2), top=1)
        assert one.rules == (("federation", 2),)
        with pytest.raises(InvalidRequest):
            await store.activity(since, since, top=5)
        with pytest.raises(InvalidRequest):
            await store.activity(since, since + timedelta(days=1), top=0)
        far = await store.activity(datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC))
        assert sum(d.total for d in far.days) == len(records)
