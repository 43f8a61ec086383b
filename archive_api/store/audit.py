"""The audit log's record format: events, their hash chain, paging cursors and verification.

Backend-neutral: every store keeps the same fields and checks them with the same code, so an
audit log verifies the same way on SQLite and on Elasticsearch.

An event is one line of "who did what, with which parameters, to what effect". Its chain
link follows `archive_api/store/chain.py`: `hash = SHA-256(prev_hash || seq || payload)`,
the first event's prev_hash is 32 zero bytes, and `payload` is the canonical JSON (sorted
keys, no spaces, UTF-8) of

    {"action", "actor", "at", "outcome", "params", "result_count", "role", "v": 1}

where `at` is the ISO 8601 UTC time in microseconds and `params` is a JSON object. A store
keeps the fields (params as its canonical JSON text) plus prev_hash and hash, and rebuilds
the payload from the fields to verify: editing any stored field breaks that event's hash.
Checkpoints are the chain's usual Ed25519 `Checkpoint`s under the chain name `AUDIT_CHAIN`.

The store assigns `seq` and `prev_hash` inside its own write serialisation (a SQLite write
transaction; an optimistic create-if-absent on Elasticsearch), never the caller: two
processes appending at once must not both take the same seq.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from archive_api.store.chain import GENESIS, ChainBreak, Checkpoint, link_hash
from archive_api.store.errors import InvalidCursor, InvalidRequest
from archive_api.store.records import canonical_json

AUDIT_CHAIN: Final = "audit"
"""The chain name audit checkpoints are signed under (spool chains use their own names)."""

AUDIT_FORMAT: Final = 1
MAX_ACTOR_CHARS: Final = 256
MAX_ROLE_CHARS: Final = 64
MAX_ACTION_CHARS: Final = 64
MAX_OUTCOME_CHARS: Final = 32
MAX_PARAMS_BYTES: Final = 64 * 1024
"""The store refuses larger parameters; `archive_api.audit.AuditLog` digests them first."""
MAX_APPEND_BATCH: Final = 1000
MAX_AUDIT_PAGE: Final = 1000
MAX_VERIFY_PROBLEMS: Final = 1000

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US: Final = timedelta(microseconds=1)
_CURSOR_VERSION: Final = 1


def to_us(at: datetime) -> int:
    """Microseconds since 1970 (UTC) of an aware datetime; a naive one is refused."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise InvalidRequest("audit times must be timezone-aware")
    return (at - _EPOCH) // _ONE_US


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _check_text(what: str, value: object, limit: int, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"audit {what} must be text")
    if (not value and not empty) or len(value) > limit or not value.isprintable():
        raise InvalidRequest(
            f"audit {what} must be 1 to {limit} printable characters, got {value[:40]!r}"
        )
    return value


def canonical_params(params: Mapping[str, Any]) -> str:
    """The canonical JSON text of a parameters object, whatever its size.

    InvalidRequest for what JSON cannot carry faithfully: NaN and infinities, lone
    surrogates, objects that are not JSON values, a top level that is not a mapping.
    """
    if not isinstance(params, Mapping):
        raise InvalidRequest("audit parameters must be a JSON object")
    try:
        text = json.dumps(
            dict(params), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        text.encode()
    except (TypeError, ValueError, RecursionError, UnicodeEncodeError) as exc:
        raise InvalidRequest(f"audit parameters are not JSON ({type(exc).__name__})") from None
    return text


def params_text(params: Mapping[str, Any]) -> str:
    """`canonical_params`, refusing more than MAX_PARAMS_BYTES (what a store keeps)."""
    text = canonical_params(params)
    size = len(text.encode())
    if size > MAX_PARAMS_BYTES:
        raise InvalidRequest(
            f"audit parameters too large ({size} bytes; at most {MAX_PARAMS_BYTES})"
        )
    return text


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """An audit event as the service hands it to the store, before it has a place in the chain.

    `actor` names who acted (an identity's subject: ``token:ci-export``, ``cli:root``);
    `role` the role they acted in (None when there is none, as for a failed sign-in);
    `action` and `outcome` are short words (``search``, ``ok``); `params` a JSON object.
    """

    at: datetime
    actor: str
    action: str
    params: Mapping[str, Any]
    outcome: str
    role: str | None = None
    result_count: int | None = None


class AuditRow(NamedTuple):
    """An event's stored fields exactly as a backend keeps them (what verification reads)."""

    seq: int
    at_us: int
    actor: str
    role: str | None
    action: str
    params: str  # canonical JSON text
    result_count: int | None
    outcome: str
    prev_hash: bytes
    hash: bytes


class CheckedEntry(NamedTuple):
    """An entry whose fields passed `check_entry`: ready to be chained and stored."""

    at_us: int
    actor: str
    role: str | None
    action: str
    params: str
    result_count: int | None
    outcome: str


def check_entry(entry: AuditEntry) -> CheckedEntry:
    """Validate an entry's fields (InvalidRequest naming the bad one) and normalise them."""
    if not isinstance(entry, AuditEntry):
        raise InvalidRequest("expected an AuditEntry")
    count = entry.result_count
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        raise InvalidRequest("audit result_count must be a non-negative integer or None")
    if count is not None and count >= 1 << 63:
        raise InvalidRequest("audit result_count out of range")
    if not isinstance(entry.at, datetime):
        raise InvalidRequest("audit time must be a datetime")
    return CheckedEntry(
        at_us=to_us(entry.at),
        actor=_check_text("actor", entry.actor, MAX_ACTOR_CHARS),
        role=None if entry.role is None else _check_text("role", entry.role, MAX_ROLE_CHARS),
        action=_check_text("action", entry.action, MAX_ACTION_CHARS),
        params=params_text(entry.params),
        result_count=count,
        outcome=_check_text("outcome", entry.outcome, MAX_OUTCOME_CHARS),
    )


def _json_text(value: str | int | None) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def event_payload(
    at_us: int,
    actor: str,
    role: str | None,
    action: str,
    params: str,
    result_count: int | None,
    outcome: str,
) -> bytes:
    """The bytes an event's hash covers (see the module notes), built from stored fields.

    Equal to `canonical_json` of the whole event when `params` is canonical; the stored
    params text goes in verbatim, so any edit to it changes the hash.
    """
    return b"".join(
        (
            b'{"action":',
            _json_text(action),
            b',"actor":',
            _json_text(actor),
            b',"at":',
            _json_text(from_us(at_us).isoformat()),
            b',"outcome":',
            _json_text(outcome),
            b',"params":',
            params.encode(),
            b',"result_count":',
            _json_text(result_count),
            b',"role":',
            _json_text(role),
            b',"v":',
            str(AUDIT_FORMAT).encode(),
            b"}",
        )
    )


def row_payload(row: AuditRow) -> bytes:
    return event_payload(
        row.at_us, row.actor, row.role, row.action, row.params, row.result_count, row.outcome
    )


def chain_entry(entry: CheckedEntry, seq: int, prev_hash: bytes) -> AuditRow:
    """The stored row of a checked entry placed at `seq` after `prev_hash`."""
    payload = event_payload(*entry)
    return AuditRow(
        seq=seq,
        at_us=entry.at_us,
        actor=entry.actor,
        role=entry.role,
        action=entry.action,
        params=entry.params,
        result_count=entry.result_count,
        outcome=entry.outcome,
        prev_hash=prev_hash,
        hash=link_hash(prev_hash, seq, payload),
    )


def imported_rows(events: Iterable[AuditEvent], head: AuditHead) -> list[AuditRow]:
    """The stored rows of events copied from another store's log, checked to continue the log
    whose head is `head`: consecutive seqs, each prev_hash the hash before it, each hash what
    the event's fields hash to (so nothing can be edited on the way). InvalidRequest if not."""
    rows: list[AuditRow] = []
    seq, prev = head.seq, head.hash
    for event in events:
        if not isinstance(event, AuditEvent):
            raise InvalidRequest("expected AuditEvents")
        if event.seq != seq + 1 or event.prev_hash != prev:
            raise InvalidRequest(
                f"audit event {event.seq} does not continue this log (its head is seq {seq})"
            )
        checked = check_entry(
            AuditEntry(
                event.at,
                event.actor,
                event.action,
                event.params,
                event.outcome,
                event.role,
                event.result_count,
            )
        )
        row = chain_entry(checked, event.seq, event.prev_hash)
        if row.hash != event.hash:
            raise InvalidRequest(f"audit event {event.seq} does not match its hash")
        rows.append(row)
        seq, prev = row.seq, row.hash
    return rows


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One event of the audit log as readers see it (the params parsed back into a dict)."""

    seq: int
    at: datetime
    actor: str
    role: str | None
    action: str
    params: dict[str, Any]
    result_count: int | None
    outcome: str
    prev_hash: bytes
    hash: bytes

    @classmethod
    def from_row(cls, row: AuditRow) -> AuditEvent:
        """Raises ValueError when the stored params are not a JSON object (tampering)."""
        params = json.loads(row.params)
        if not isinstance(params, dict):
            raise ValueError("audit params are not a JSON object")
        return cls(
            row.seq,
            from_us(row.at_us),
            row.actor,
            row.role,
            row.action,
            params,
            row.result_count,
            row.outcome,
            row.prev_hash,
            row.hash,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON form for the API: hashes in hex, time in ISO 8601."""
        return {
            "seq": self.seq,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "role": self.role,
            "action": self.action,
            "params": self.params,
            "result_count": self.result_count,
            "outcome": self.outcome,
            "prev_hash": self.prev_hash.hex(),
            "hash": self.hash.hex(),
        }


@dataclass(frozen=True, slots=True)
class AuditHead:
    """The last event's seq and hash; (0, 32 zero bytes) for an empty log."""

    seq: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which events a page shows: all of the given conditions hold.

    `since` is inclusive and `until` exclusive; both must be timezone-aware.
    """

    actor: str | None = None
    action: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def checked(self) -> tuple[str | None, str | None, int | None, int | None]:
        """(actor, action, since_us, until_us), or InvalidRequest naming the bad field."""
        actor = None if self.actor is None else _check_text("actor", self.actor, MAX_ACTOR_CHARS)
        action = (
            None if self.action is None else _check_text("action", self.action, MAX_ACTION_CHARS)
        )
        since = None if self.since is None else to_us(self.since)
        until = None if self.until is None else to_us(self.until)
        return actor, action, since, until

    def key(self, newest_first: bool) -> str:
        """What a cursor is bound to: the same filter in the same order."""
        actor, action, since, until = self.checked()
        text = canonical_json([actor, action, since, until, newest_first])
        return hashlib.sha256(text).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class AuditPage:
    events: tuple[AuditEvent, ...]
    next_cursor: str | None  # None on the last page


def check_page_args(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_AUDIT_PAGE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_AUDIT_PAGE}")


def encode_cursor(where: AuditFilter, newest_first: bool, last_seq: int) -> str:
    data = [_CURSOR_VERSION, where.key(newest_first), last_seq]
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, where: AuditFilter, newest_first: bool) -> int:
    """The last seq the previous page showed; InvalidCursor if forged or for another filter."""
    if not isinstance(cursor, str) or len(cursor) > 200:
        raise InvalidCursor("malformed paging cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, key, last_seq = json.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidCursor("malformed paging cursor") from None
    if version != _CURSOR_VERSION or key != where.key(newest_first):
        raise InvalidCursor("the paging cursor belongs to a different filter or order")
    if not isinstance(last_seq, int) or isinstance(last_seq, bool) or not 0 <= last_seq < 1 << 62:
        raise InvalidCursor("malformed paging cursor")
    return last_seq


@dataclass(frozen=True, slots=True)
class AuditVerifyReport:
    """What verifying the audit log found.

    `problems` are ordered by seq; the first is the first break. `signatures_checked` is
    False when no public key was given (then only the checkpoints' heads were compared).
    """

    last_seq: int
    head: bytes
    events_checked: int
    checkpoints_checked: int
    signatures_checked: bool
    problems: tuple[ChainBreak, ...]
    problems_truncated: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_break(self) -> ChainBreak | None:
        return self.problems[0] if self.problems else None


class AuditVerifier:
    """Checks an audit log fed to it in seq order; backends stream their rows into `feed`.

    Per event: seqs run 1, 2, 3... with no gap (a gap is reported once, then checking
    resumes after it), prev_hash is the hash of the event before, and the hash covers the
    payload rebuilt from the stored fields (so an edited field is found). At the end: the
    last event is the head the store recorded (events removed from the end), and every
    checkpoint lies within the log, signs exactly the stored hash at its seq, and (given a
    public key) carries a valid Ed25519 signature.
    """

    def __init__(
        self, checkpoints: Iterable[Checkpoint], public_key: Ed25519PublicKey | None
    ) -> None:
        self._checkpoints = tuple(checkpoints)
        self._key = public_key
        self._wanted = {cp.seq for cp in self._checkpoints}
        self._hashes: dict[int, bytes] = {}
        self._problems: list[ChainBreak] = []
        self._truncated = False
        self._expected = 1
        self._prev = GENESIS
        self._last_seq = 0
        self._last_hash = GENESIS
        self._events = 0

    def _problem(self, seq: int, problem: str) -> None:
        if len(self._problems) >= MAX_VERIFY_PROBLEMS:
            self._truncated = True
            return
        self._problems.append(ChainBreak(seq, problem))

    def feed(self, row: AuditRow) -> None:
        self._events += 1
        seq = row.seq
        if seq != self._expected:
            if seq > self._expected:
                first, last = self._expected, seq - 1
                gap = f"event {first} is" if first == last else f"events {first}..{last} are"
                self._problem(first, f"{gap} missing (deleted)")
            else:
                self._problem(seq, "event out of order or repeated")
            self._prev = row.prev_hash  # resynchronise so one gap is reported once
        if row.prev_hash != self._prev:
            self._problem(seq, "previous-hash does not match the event before it")
        if link_hash(row.prev_hash, seq, row_payload(row)) != row.hash:
            self._problem(seq, "content does not match its hash (edited)")
        else:
            try:
                AuditEvent.from_row(row)
            except ValueError:
                self._problem(seq, "parameters are not a JSON object")
        if seq in self._wanted:
            self._hashes[seq] = row.hash
        self._prev, self._expected = row.hash, max(self._expected, seq + 1)
        self._last_seq, self._last_hash = seq, row.hash

    def finish(self, recorded: AuditHead | None) -> AuditVerifyReport:
        """Close the run; `recorded` is the head the store keeps (None: its record is gone)."""
        if recorded is None:
            self._problem(max(self._last_seq, 1), "the log's recorded head is missing")
        elif recorded.seq != self._last_seq or recorded.hash != self._last_hash:
            self._problem(
                min(self._last_seq, recorded.seq) + 1,
                f"the log ends at seq {self._last_seq} but its head was recorded at seq "
                f"{recorded.seq} (events removed from the end?)",
            )
        for cp in self._checkpoints:
            if cp.chain_name != AUDIT_CHAIN:
                self._problem(cp.seq, f"checkpoint for another chain ({cp.chain_name[:40]!r})")
            elif cp.seq > self._last_seq:
                self._problem(
                    cp.seq, "a signed checkpoint lies past the end of the log (truncated)"
                )
            elif cp.seq not in self._hashes:
                self._problem(cp.seq, "the event a checkpoint signs is missing")
            elif self._hashes[cp.seq] != cp.head:
                self._problem(cp.seq, "stored hash differs from the signed checkpoint")
            if self._key is not None and not cp.verify(self._key):
                self._problem(cp.seq, "checkpoint signature does not verify")
        problems = sorted(self._problems, key=lambda p: p.seq)
        return AuditVerifyReport(
            last_seq=self._last_seq,
            head=self._last_hash,
            events_checked=self._events,
            checkpoints_checked=len(self._checkpoints),
            signatures_checked=self._key is not None,
            problems=tuple(problems),
            problems_truncated=self._truncated,
        )
