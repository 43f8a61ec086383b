"""Legal holds: what they cover, who may release them, and the service that keeps them.

A hold names a case and a scope:

- `PersonScope`: every record where a JID is either party, by bare JID (`alice@corp.example`)
  or a whole domain (`*@partner.example`);
- `ConversationScope`: a 1:1 conversation (two bare JIDs, either direction) or a room, with an
  optional time window (`after` inclusive, `before` exclusive, like the search language);
- `SavedSearchScope`: a query in the officers' search language, frozen at creation in its
  canonical form.

Every scope is a `Query` of the search language, so one mechanism answers "is this held?":
the store evaluates the active holds' queries itself, inside the purge transaction. A hold
covers records that match its scope whenever they arrive, so a hold on a person also keeps
what they write after it was placed.

Holds are placed by officers and admins; only admins release them (`release` takes the
actor's role explicitly and records who released it and why). Placing and releasing are
audited by the caller, which holds the audit log: these functions return what to record.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from archive_api.auth import Role
from archive_api.errors import HoldAlreadyReleased, InvalidInput, NotPermitted, UnknownHold
from archive_api.store.base import MAX_PAGE_SIZE, ArchiveStore, HoldRecord
from archive_api.store.errors import InvalidRequest, NotFound, QuerySyntaxError
from archive_api.store.query import (
    Clause,
    JidKind,
    PartyTerm,
    Query,
    RoomTerm,
    TimeBound,
    TimeTerm,
    parse_query,
)
from classifier.clock import Clock

ADMIN_ROLE = Role.ADMIN  # the only role that may release a hold
MAX_CASE_NAME = 200
MAX_ACTOR = 320
MAX_REASON = 2000


@dataclass(frozen=True, slots=True)
class PersonScope:
    jid: str  # normalised bare JID, or "*@domain"

    @property
    def kind(self) -> str:
        return "person"


@dataclass(frozen=True, slots=True)
class ConversationScope:
    """A 1:1 conversation (`participants`) or a room (`room`), optionally in a time window."""

    participants: tuple[str, str] | None = None  # two normalised bare JIDs, sorted
    room: str | None = None  # a normalised room JID
    after: datetime | None = None  # inclusive, UTC
    before: datetime | None = None  # exclusive, UTC

    @property
    def kind(self) -> str:
        return "conversation"


@dataclass(frozen=True, slots=True)
class SavedSearchScope:
    query: str  # canonical text: str(parse_query(original))

    @property
    def kind(self) -> str:
        return "search"


HoldScope = PersonScope | ConversationScope | SavedSearchScope


# --- building scopes from what an officer typed -------------------------------------------


def _clean(text: str, what: str, limit: int) -> str:
    text = text.strip()
    if not text:
        raise InvalidInput(f"{what} must not be empty")
    if len(text) > limit:
        raise InvalidInput(f"{what} is longer than {limit} characters")
    if not text.isprintable():
        raise InvalidInput(f"{what} must not contain control characters")
    return text


def _jid_term(field: str, value: str, what: str) -> PartyTerm | RoomTerm:
    """Validate one JID with the search language's own rules (one term, nothing else)."""
    value = value.strip()
    if not value or any(ch.isspace() or ch == '"' for ch in value):
        raise InvalidInput(f"{what}: {value[:80]!r} is not a JID (no spaces or quotes)")
    try:
        query = parse_query(f"{field}:{value}")
    except QuerySyntaxError as exc:
        raise InvalidInput(f"{what}: {exc.message}") from None
    (clause,) = query.clauses
    term = clause.term
    assert isinstance(term, PartyTerm | RoomTerm)
    return term


def person_scope(jid: str) -> PersonScope:
    """A person by bare JID or `*@domain` (a full JID with /resource is refused: a hold on
    one device of a person would miss the others)."""
    term = _jid_term("with", jid, "person")
    assert isinstance(term, PartyTerm)
    if term.jid.kind is JidKind.FULL:
        raise InvalidInput("person: give a bare JID or *@domain, not a full JID with /resource")
    return PersonScope(str(term.jid))


def _aware(at: datetime | None, what: str) -> datetime | None:
    if at is None:
        return None
    if at.tzinfo is None:
        raise InvalidInput(f"{what} must carry a time zone")
    return at.astimezone(UTC)


def conversation_scope(
    *,
    participants: tuple[str, str] | None = None,
    room: str | None = None,
    after: datetime | None = None,
    before: datetime | None = None,
) -> ConversationScope:
    if (participants is None) == (room is None):
        raise InvalidInput("conversation: give either two participants or a room")
    after, before = _aware(after, "after"), _aware(before, "before")
    if after is not None and before is not None and after >= before:
        raise InvalidInput("conversation: 'after' must be earlier than 'before'")
    if room is not None:
        term = _jid_term("room", room, "room")
        assert isinstance(term, RoomTerm)
        if term.room.kind is not JidKind.BARE:
            raise InvalidInput("room: give the room's bare JID (room@service), not *@service")
        return ConversationScope(room=str(term.room), after=after, before=before)
    assert participants is not None
    if len(participants) != 2:
        raise InvalidInput("conversation: give exactly two participants")
    bare = []
    for jid in participants:
        term = _jid_term("with", jid, "participant")
        assert isinstance(term, PartyTerm)
        if term.jid.kind is not JidKind.BARE:
            raise InvalidInput("participant: give a bare JID (user@domain)")
        bare.append(str(term.jid))
    if bare[0] == bare[1]:
        raise InvalidInput("conversation: the two participants must differ")
    first, second = sorted(bare)
    return ConversationScope(participants=(first, second), after=after, before=before)


def saved_search_scope(text: str) -> SavedSearchScope:
    """A query frozen in canonical form. QuerySyntaxError (with its position) when malformed."""
    query = parse_query(text)
    if not query.clauses:
        raise InvalidInput("a saved-search hold needs at least one search term")
    return SavedSearchScope(str(query))


def scope_query(scope: HoldScope) -> Query:
    """The records a scope covers, as a query of the search language."""
    match scope:
        case PersonScope(jid=jid):
            return parse_query(f"with:{jid}")
        case SavedSearchScope(query=text):
            return parse_query(text)
        case ConversationScope(participants=participants, room=room, after=after, before=before):
            clauses: list[Clause] = []
            if participants is not None:
                # Both as either party: exactly the messages between the two, both directions.
                clauses.extend(parse_query(f"with:{jid}").clauses[0] for jid in participants)
            else:
                clauses.append(parse_query(f"room:{room}").clauses[0])
            if after is not None:
                clauses.append(Clause(TimeTerm(TimeBound.AFTER, after)))
            if before is not None:
                clauses.append(Clause(TimeTerm(TimeBound.BEFORE, before)))
            return Query(tuple(clauses))


def scope_to_json(scope: HoldScope) -> dict[str, Any]:
    match scope:
        case PersonScope(jid=jid):
            return {"kind": "person", "jid": jid}
        case SavedSearchScope(query=text):
            return {"kind": "search", "query": text}
        case ConversationScope(participants=participants, room=room, after=after, before=before):
            return {
                "kind": "conversation",
                "participants": list(participants) if participants is not None else None,
                "room": room,
                "after": after.isoformat() if after is not None else None,
                "before": before.isoformat() if before is not None else None,
            }


def scope_from_json(data: Any) -> HoldScope:
    """Rebuild (and re-validate) a scope from its JSON form; InvalidInput when it is not one."""
    if not isinstance(data, dict):
        raise InvalidInput("a hold scope must be a JSON object")
    kind = data.get("kind")
    try:
        if kind == "person":
            return person_scope(_str(data, "jid"))
        if kind == "search":
            return saved_search_scope(_str(data, "query"))
        if kind == "conversation":
            participants = data.get("participants")
            pair: tuple[str, str] | None = None
            if participants is not None:
                if not isinstance(participants, list) or len(participants) != 2:
                    raise InvalidInput("participants must be a list of two JIDs")
                pair = (_item(participants[0]), _item(participants[1]))
            room = data.get("room")
            if room is not None and not isinstance(room, str):
                raise InvalidInput("room must be a string")
            return conversation_scope(
                participants=pair,
                room=room,
                after=_time(data.get("after"), "after"),
                before=_time(data.get("before"), "before"),
            )
    except QuerySyntaxError as exc:
        raise InvalidInput(f"hold scope: {exc}") from None
    raise InvalidInput(f"unknown hold scope kind {str(kind)[:40]!r}")


def _str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise InvalidInput(f"hold scope: {key} must be a string")
    return value


def _item(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidInput("participants must be strings")
    return value


def _time(value: Any, what: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be an ISO 8601 date-time string")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"{what}: {value[:40]!r} is not an ISO 8601 date-time") from None


# --- holds ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hold:
    hold_id: str
    case_name: str
    created_by: str
    created_at: datetime
    scope: HoldScope
    released_at: datetime | None = None
    released_by: str | None = None
    release_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.released_at is None

    @property
    def query(self) -> Query:
        return scope_query(self.scope)

    def to_json(self) -> dict[str, Any]:
        """The hold as the API and the audit log show it."""
        return {
            "hold_id": self.hold_id,
            "case_name": self.case_name,
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat(),
            "scope": scope_to_json(self.scope),
            "query": str(self.query),
            "active": self.active,
            "released_at": self.released_at.isoformat() if self.released_at else None,
            "released_by": self.released_by,
            "release_reason": self.release_reason,
        }

    def to_record(self) -> HoldRecord:
        return HoldRecord(
            hold_id=self.hold_id,
            case_name=self.case_name,
            created_by=self.created_by,
            created_at=self.created_at,
            scope=json.dumps(scope_to_json(self.scope), sort_keys=True, ensure_ascii=False),
            query=str(self.query),
            released_at=self.released_at,
            released_by=self.released_by,
            release_reason=self.release_reason,
        )

    @classmethod
    def from_record(cls, record: HoldRecord) -> Hold:
        try:
            scope = scope_from_json(json.loads(record.scope))
        except ValueError as exc:  # InvalidInput and JSONDecodeError both are
            raise InvalidInput(f"stored hold {record.hold_id!r} has an unreadable scope") from exc
        return cls(
            hold_id=record.hold_id,
            case_name=record.case_name,
            created_by=record.created_by,
            created_at=record.created_at,
            scope=scope,
            released_at=record.released_at,
            released_by=record.released_by,
            release_reason=record.release_reason,
        )


def new_hold_id() -> str:
    return "hold-" + secrets.token_hex(8)


class HoldService:
    """Place, release, list and look up legal holds on a store. Time comes from `clock`."""

    def __init__(
        self, store: ArchiveStore, clock: Clock, *, new_id: Callable[[], str] = new_hold_id
    ) -> None:
        self._store = store
        self._clock = clock
        self._new_id = new_id

    async def place(self, case_name: str, scope: HoldScope, *, actor: str) -> Hold:
        hold = Hold(
            hold_id=self._new_id(),
            case_name=_clean(case_name, "case name", MAX_CASE_NAME),
            created_by=_clean(actor, "actor", MAX_ACTOR),
            created_at=self._clock.now(),
            scope=scope,
        )
        await self._store.add_hold(hold.to_record())
        return hold

    async def release(
        self, hold_id: str, *, actor: str, actor_role: Role | str, reason: str | None = None
    ) -> Hold:
        """Release a hold; only an admin may (NotPermitted otherwise, and nothing changes)."""
        if actor_role != ADMIN_ROLE:
            raise NotPermitted(
                f"only an admin may release a legal hold (the actor's role is "
                f"{str(actor_role)[:40]!r})"
            )
        if reason is not None:
            reason = _clean(reason, "release reason", MAX_REASON)
        try:
            released = await self._store.release_hold(
                hold_id,
                released_by=_clean(actor, "actor", MAX_ACTOR),
                released_at=self._clock.now(),
                reason=reason,
            )
        except NotFound:
            raise UnknownHold(hold_id) from None
        except InvalidRequest as exc:
            raise HoldAlreadyReleased(str(exc)) from None
        return Hold.from_record(released)

    async def get(self, hold_id: str) -> Hold:
        record = await self._store.get_hold(hold_id)
        if record is None:
            raise UnknownHold(hold_id)
        return Hold.from_record(record)

    async def list(self, *, include_released: bool = True) -> tuple[Hold, ...]:
        records = await self._store.list_holds(include_released=include_released)
        return tuple(Hold.from_record(r) for r in records)

    async def holds_on(self, record_id: str) -> tuple[Hold, ...]:
        """The active holds covering one record (empty: it may be purged when it expires)."""
        covering = await self._store.holds_covering([record_id])
        return tuple([await self.get(hold_id) for hold_id in covering.get(record_id, ())])

    async def is_held(self, record_id: str) -> bool:
        return bool(await self._store.holds_covering([record_id]))

    async def held_record_ids(
        self, query: Query | str, *, page_size: int = MAX_PAGE_SIZE
    ) -> AsyncIterator[str]:
        """The ids of records matching `query` that some active hold covers, page by page
        (a generator, so a large result never sits in memory at once)."""
        cursor: str | None = None
        while True:
            page = await self._store.search(query, limit=page_size, cursor=cursor, sort="time_asc")
            covering = await self._store.holds_covering([h.record.record_id for h in page.hits])
            for hit in page.hits:
                if hit.record.record_id in covering:
                    yield hit.record.record_id
            if page.next_cursor is None:
                return
            cursor = page.next_cursor
