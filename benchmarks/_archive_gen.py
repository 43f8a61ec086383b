"""Realistic spool entries for the benchmarks: the generator behind bench_indexing and
bench_search.

Chat, groupchat and headline messages as the pipeline archives them (`ArchiveRecord` with
bodies of realistic lengths from a Zipf vocabulary, 1-3 observations, verdicts with reasons,
the raw stanza of ~300-600 bytes), a few subscription requests, spam reports and session
records, and the OBSERVE / STATUS / repeated RECORD entries that carbons, MAM replays and
officer releases add, among thousands of users, dozens of rooms and domains, a few of them
arriving late. Fixed seed, so every run produces the same bytes; `iter_links` hash-chains
them into `ChainLink`s exactly as the spool does.

A `Profile` sets what differs between benchmarks. `INDEXING` (the default) is what
bench_indexing has always generated, entry for entry: about two office days at ~4 messages a
second. `ARCHIVE` spreads the entries over a year of working days, with a larger world,
finance phrases in some bodies and corrections/retractions that point at the sender's real
earlier message, so `is:edited` finds both sides.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from archive_api.store.chain import GENESIS, ChainLink, link_hash
from archive_api.store.records import (
    ArchiveRecord,
    Attachment,
    Direction,
    EntryOp,
    Observation,
    ObservationVia,
    RecordKind,
    RecordStatus,
    SpoolEntry,
    StanzaIdRef,
    deterministic_record_id,
)
from classifier.verdict import Action, Reason, Verdict

SEED = 20260115
START = datetime(2026, 1, 5, 7, 0, tzinfo=UTC)  # a Monday

# --- corpus ------------------------------------------------------------------------------


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_SYLLABLES = _words(
    "ka ro mi te su na lo pe ri ta ve do an el or is un et ar om "
    "qu st pr tr ch sh th br gr pl fl cl"
)
_COMMON = _words(
    "the a to and of is in it you that for on we this be are have with not can will at "
    "just so but do if me my your what ok yes no thanks please meeting call today tomorrow "
    "deal price client report trade market order risk team update send check let know "
    "lunch coffee friday monday morning later soon now sure great good fine again quick"
)
_TLDS = ("com", "net", "org", "io", "de", "co.uk")
_ACCENTED = ["café", "résumé", "naïve", "Zürich", "São", "crème", "déjà", "façade"]
# What compliance officers look for, from frequent to rare (relative weights).
FINANCE_PHRASES: tuple[tuple[str, float], ...] = (
    ("guaranteed return", 10.0),
    ("wire transfer", 10.0),
    ("bond yield spread", 6.0),
    ("before the announcement", 4.0),
    ("insider information", 2.0),
    ("off the books", 1.5),
    ("delete this chat", 1.0),
    ("kickback", 0.3),
)


@dataclass(frozen=True, slots=True)
class Profile:
    """What one benchmark's archive looks like; the defaults are bench_indexing's."""

    mean_gap_us: int = 250_000  # between entries, in office hours (07:00-19:00 UTC)
    weekends: bool = True  # False: nothing on Saturdays and Sundays
    remote_domains: int = 80
    local_users: int = 3000
    remote_users: int = 3000
    rooms: int = 60
    finance_rate: float = 0.0  # share of bodies with one of FINANCE_PHRASES in them
    linked_edits: bool = False  # corrections/retractions name the sender's last message


INDEXING = Profile()
# ~1,000,000 entries fill the 261 working days of a year: 261 x 12 h / 1M ≈ 11.3 s apart.
ARCHIVE = Profile(
    mean_gap_us=11_275_000,
    weekends=False,
    remote_domains=400,
    local_users=4000,
    remote_users=8000,
    rooms=48,
    finance_rate=0.02,
    linked_edits=True,
)


@dataclass(frozen=True, slots=True)
class World:
    local_domains: tuple[str, ...]
    remote_domains: tuple[str, ...]
    local_users: tuple[str, ...]
    remote_users: tuple[str, ...]
    rooms: tuple[str, ...]
    vocabulary: tuple[str, ...]
    cum_weights: tuple[float, ...]


def make_world(rng: random.Random, profile: Profile = INDEXING) -> World:
    local_domains = ("corp.example", "eu.corp.example", "ops.corp.example")
    remote_domains = tuple(
        f"{rng.choice(_SYLLABLES)}{rng.choice(_SYLLABLES)}{i}.{rng.choice(_TLDS)}"
        for i in range(profile.remote_domains)
    )
    n_local = profile.local_users
    names = [
        f"{rng.choice(_SYLLABLES)}{rng.choice(_SYLLABLES)}{i}"
        for i in range(n_local + profile.remote_users)
    ]
    local_users = tuple(f"{names[i]}@{rng.choice(local_domains)}" for i in range(n_local))
    remote_users = tuple(
        f"{names[n_local + i]}@{rng.choice(remote_domains)}" for i in range(profile.remote_users)
    )
    rooms = tuple(f"desk{i}@conference.{rng.choice(local_domains)}" for i in range(profile.rooms))
    invented = {
        "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(20000)
    }
    vocabulary = tuple(_COMMON) + tuple(_ACCENTED) + tuple(sorted(invented))
    # Zipf-like: word n is 1/n as frequent as the first.
    cum_weights = tuple(itertools.accumulate(1.0 / (n + 1) for n in range(len(vocabulary))))
    return World(
        local_domains, remote_domains, local_users, remote_users, rooms, vocabulary, cum_weights
    )


_FINANCE_TEXTS = tuple(text for text, _ in FINANCE_PHRASES)
_FINANCE_CUM = tuple(itertools.accumulate(weight for _, weight in FINANCE_PHRASES))


def body_text(rng: random.Random, world: World, finance_rate: float = 0.0) -> str:
    """A chat line: mostly short, sometimes a paragraph, rarely a pasted page."""
    roll = rng.random()
    if roll < 0.6:
        words = rng.randint(1, 10)
    elif roll < 0.92:
        words = rng.randint(10, 30)
    elif roll < 0.995:
        words = rng.randint(30, 120)
    else:
        words = rng.randint(120, 400)
    chosen = rng.choices(world.vocabulary, cum_weights=world.cum_weights, k=words)
    # Only a profile with finance phrases draws for them, so INDEXING stays as it was.
    if finance_rate and rng.random() < finance_rate:
        phrase = rng.choices(_FINANCE_TEXTS, cum_weights=_FINANCE_CUM)[0]
        chosen.insert(rng.randint(0, len(chosen)), phrase)
    text = " ".join(chosen)
    if rng.random() < 0.2:
        text = text[0].upper() + text[1:] + rng.choice(["?", "!", ".", " :)"])
    if rng.random() < 0.05:
        text += f" https://files.{rng.choice(world.local_domains)}/s/{rng.getrandbits(48):x}"
    return text


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;")


def stanza_xml(
    sender_full: str,
    recipient: str,
    stanza_type: str,
    msg_id: str,
    body: str | None,
    extra: str = "",
) -> bytes:
    parts = [
        f"<message xmlns='jabber:client' from='{_esc(sender_full)}' to='{_esc(recipient)}' "
        f"type='{stanza_type}' id='{msg_id}' xml:lang='en'>"
    ]
    if body is not None:
        parts.append(f"<body>{_esc(body)}</body>")
    parts.append(
        f"<origin-id xmlns='urn:xmpp:sid:0' id='{msg_id}'/>"
        "<request xmlns='urn:xmpp:receipts'/><markable xmlns='urn:xmpp:chat-markers:0'/>"
        "<active xmlns='http://jabber.org/protocol/chatstates'/>"
    )
    parts.append(extra)
    parts.append("</message>")
    return "".join(parts).encode()


def _verdict(rng: random.Random) -> Verdict:
    roll = rng.random()
    if roll < 0.90:
        reasons: tuple[Reason, ...] = ()
        if rng.random() < 0.5:
            reasons = (Reason("roster.trusted", "sender in recipient's roster", -0.2),)
        return Verdict(Action.ALLOW, round(rng.random() * 0.2, 4), reasons, "pol-3f9a1c2e")
    action = rng.choice([Action.FLAG, Action.FLAG, Action.QUARANTINE, Action.REJECT, Action.DROP])
    return Verdict(
        action,
        round(0.5 + rng.random() * 0.5, 4),
        (
            Reason("model.text", "spam score 0.87 from the text model", 0.6, Action.FLAG),
            Reason("rate.sender", "47 distinct recipients in 10 minutes", 0.3, action),
        ),
        "pol-3f9a1c2e",
    )


def _resource(rng: random.Random) -> str:
    return rng.choice(["phone", "laptop", "desktop", "gajim.X1", "conversations.Q2", "web"])


def make_entries(count: int, seed: int = SEED) -> list[SpoolEntry]:
    """`count` spool entries of the INDEXING profile, in a list."""
    return list(iter_entries(count, seed))


def iter_entries(count: int, seed: int = SEED, profile: Profile = INDEXING) -> Iterator[SpoolEntry]:
    """`count` spool entries: ~95% new RECORDs, the rest OBSERVE, STATUS, replayed RECORDs."""
    rng = random.Random(seed)
    world = make_world(rng, profile)
    recent: list[ArchiveRecord] = []
    # Sender -> message id of their last plain message, for linked corrections.
    last_message: dict[str, str] | None = {} if profile.linked_edits else None
    now = START
    for n in range(count):
        # ~4 messages a second in office hours, nothing at night: spans days to weeks.
        now += timedelta(microseconds=int(rng.expovariate(1 / profile.mean_gap_us)))
        if now.hour >= 19:
            now = (now + timedelta(days=1)).replace(hour=7, minute=0)
        if not profile.weekends and now.weekday() >= 5:
            now = (now + timedelta(days=7 - now.weekday())).replace(hour=7, minute=0)
        roll = rng.random()
        if recent and roll < 0.03:
            # A carbon or another device: a new observation of a recent record.
            rec = rng.choice(recent)
            obs = Observation(
                now,
                f"{rec.recipient}/{_resource(rng)}",
                ObservationVia.CARBON_RECEIVED,
                Direction.TO_CLIENT,
            )
            yield SpoolEntry(EntryOp.OBSERVE, rec.record_id, observation=obs)
            continue
        if recent and roll < 0.035:
            rec = rng.choice(recent)
            yield SpoolEntry(
                EntryOp.STATUS,
                rec.record_id,
                status=RecordStatus.RELEASED,
                actor="officer@corp.example",
                at=now,
            )
            continue
        if recent and roll < 0.045:
            # A MAM replay or offline redelivery of a record seen before: same id.
            rec = rng.choice(recent)
            obs = Observation(now, rec.recipient_full, ObservationVia.MAM, Direction.TO_CLIENT)
            yield SpoolEntry(EntryOp.RECORD, rec.record_id, record=rec.with_observation(obs))
            continue
        rec = make_record(rng, world, n, now, profile, last_message)
        recent.append(rec)
        if len(recent) > 500:
            recent.pop(0)
        yield SpoolEntry(EntryOp.RECORD, rec.record_id, record=rec)


def make_record(
    rng: random.Random,
    world: World,
    n: int,
    now: datetime,
    profile: Profile = INDEXING,
    last_message: dict[str, str] | None = None,
) -> ArchiveRecord:
    # 2% arrive late (delayed delivery, another proxy's backlog): up to an hour back.
    occurred = now - timedelta(seconds=rng.uniform(0, 3600)) if rng.random() < 0.02 else now
    roll = rng.random()
    msg_id = f"{rng.getrandbits(64):016x}-{n}"
    sender_res = _resource(rng)
    if roll < 0.005:  # session start/end
        user = rng.choice(world.local_users)
        return ArchiveRecord(
            record_id=deterministic_record_id("session", msg_id),
            kind=RecordKind.SESSION,
            occurred_at=occurred,
            direction=Direction.FROM_CLIENT,
            sender=user,
            sender_full=f"{user}/{sender_res}",
            stanza_type="start",
            client_address=f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        )
    if roll < 0.01:  # subscription request from a stranger
        sender, recipient = rng.choice(world.remote_users), rng.choice(world.local_users)
        raw = (
            f"<presence xmlns='jabber:client' from='{sender}' to='{recipient}' "
            f"type='subscribe' id='{msg_id}'><status>Hi, add me please</status>"
            f"<nick xmlns='http://jabber.org/protocol/nick'>New friend</nick></presence>"
        ).encode()
        return ArchiveRecord(
            record_id=deterministic_record_id("sub", msg_id),
            kind=RecordKind.SUBSCRIPTION,
            occurred_at=occurred,
            direction=Direction.TO_CLIENT,
            sender=sender,
            sender_full=sender,
            recipient=recipient,
            recipient_full=recipient,
            stanza_type="subscribe",
            body="Hi, add me please",
            subject="New friend",
            message_id=msg_id,
            verdict=_verdict(rng),
            raw=raw,
            observations=(
                Observation(occurred, recipient, ObservationVia.LIVE, Direction.TO_CLIENT),
            ),
        )
    if roll < 0.012:  # spam report
        reporter, reported = rng.choice(world.local_users), rng.choice(world.remote_users)
        return ArchiveRecord(
            record_id=deterministic_record_id("report", msg_id),
            kind=RecordKind.REPORT,
            occurred_at=occurred,
            direction=Direction.FROM_CLIENT,
            sender=reporter,
            sender_full=f"{reporter}/{sender_res}",
            recipient=reported,
            recipient_full=reported,
            stanza_type="report",
            message_id=msg_id,
            reported_jid=reported,
            report_reason="urn:xmpp:reporting:spam",
            report_text="unsolicited offers",
            raw=(
                f"<iq type='set' id='{msg_id}'><block xmlns='urn:xmpp:blocking'>"
                f"<item jid='{reported}'><report xmlns='urn:xmpp:reporting:1' "
                "reason='urn:xmpp:reporting:spam'/></item></block></iq>"
            ).encode(),
            observations=(
                Observation(
                    occurred, f"{reporter}/{sender_res}", ObservationVia.LIVE, Direction.FROM_CLIENT
                ),
            ),
        )
    body = body_text(rng, world, profile.finance_rate)
    room = None
    subject = None
    if roll < 0.30:  # groupchat
        room = rng.choice(world.rooms)
        sender = rng.choice(world.local_users)
        direction = Direction.FROM_CLIENT if rng.random() < 0.3 else Direction.TO_CLIENT
        stanza_type = "groupchat"
        recipient = room
        sender_full = f"{room}/{sender.split('@')[0]}"
        recipient_full = room
        if rng.random() < 0.01:
            subject = "Desk topic: " + " ".join(rng.choices(world.vocabulary, k=4))
    else:
        stanza_type = "chat" if roll < 0.97 else ("normal" if roll < 0.99 else "headline")
        local = rng.choice(world.local_users)
        other = (
            rng.choice(world.remote_users) if rng.random() < 0.4 else rng.choice(world.local_users)
        )
        direction = Direction.FROM_CLIENT if rng.random() < 0.5 else Direction.TO_CLIENT
        sender, recipient = (local, other) if direction is Direction.FROM_CLIENT else (other, local)
        sender_full = f"{sender}/{sender_res}"
        recipient_full = f"{recipient}/{_resource(rng)}" if rng.random() < 0.5 else recipient
    attachments: tuple[Attachment, ...] = ()
    extra = ""
    if rng.random() < 0.03:
        url = f"https://upload.{rng.choice(world.local_domains)}/{rng.getrandbits(64):x}/scan.pdf"
        attachments = (Attachment(url, "oob", "application/pdf", "scan.pdf", 48213),)
        extra = f"<x xmlns='jabber:x:oob'><url>{url}</url></x>"
    replaces = retracts = None
    previous = last_message.get(sender) if last_message is not None else None
    if rng.random() < 0.01:
        replaces = f"{rng.getrandbits(64):016x}-{max(n - rng.randint(1, 50), 0)}"
        replaces = previous or replaces
        extra += f"<replace xmlns='urn:xmpp:message-correct:0' id='{replaces}'/>"
    elif rng.random() < 0.003:
        retracts = f"{rng.getrandbits(64):016x}-{max(n - rng.randint(1, 50), 0)}"
        retracts = previous or retracts
        extra += f"<retract xmlns='urn:xmpp:message-retract:1' id='{retracts}'/>"
    elif last_message is not None:
        last_message[sender] = msg_id
    encryption = "omemo" if rng.random() < 0.02 else None
    raw = stanza_xml(sender_full, recipient_full, stanza_type, msg_id, body, extra)
    observations = [
        Observation(
            occurred,
            sender_full if direction is Direction.FROM_CLIENT else recipient_full,
            ObservationVia.LIVE,
            direction,
        )
    ]
    if rng.random() < 0.3:
        observations.append(
            Observation(
                occurred,
                f"{sender}/{_resource(rng)}",
                ObservationVia.CARBON_SENT,
                Direction.TO_CLIENT,
            )
        )
    stanza_ids = (StanzaIdRef(f"{rng.getrandbits(60):x}", recipient.split("/")[0]),)
    return ArchiveRecord(
        record_id=deterministic_record_id("msg", sender_full, recipient, msg_id),
        kind=RecordKind.MESSAGE,
        occurred_at=occurred,
        direction=direction,
        sender=sender,
        sender_full=sender_full,
        recipient=recipient,
        recipient_full=recipient_full,
        stanza_type=stanza_type,
        room=room,
        body=body,
        subject=subject,
        thread=None,
        message_id=msg_id,
        origin_id=msg_id,
        stanza_ids=stanza_ids,
        attachments=attachments,
        encryption=encryption,
        replaces_id=replaces,
        retracts_id=retracts,
        client_address=f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        verdict=_verdict(rng),
        raw=raw,
        observations=tuple(observations),
    )


def iter_links(entries: Iterable[SpoolEntry]) -> Iterator[ChainLink]:
    """The entries hash-chained from genesis, seq 1, 2, ... as the spool writes them."""
    head = GENESIS
    for seq, entry in enumerate(entries, 1):
        payload = entry.payload()
        digest = link_hash(head, seq, payload)
        yield ChainLink(seq, head, digest, payload)
        head = digest


def chain(entries: Sequence[SpoolEntry]) -> list[ChainLink]:
    return list(iter_links(entries))
