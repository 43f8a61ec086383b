"""Pages that read the archive: dashboard, search, one message, a conversation.

Each page calls the JSON API's own route function for what it shows (archive_api/routes/),
so a page read is the same service call, with the same checks and the same audit event
(`search`, `view`, `conversation`), as the API read it mirrors; the page only renders the
result. Errors the officer can fix (a query that does not parse, a bad time window) are
shown on the page beside the form, after the API code recorded them as `invalid`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from archive_api.auth import Identity, Permission
from archive_api.dashboard import dashboard
from archive_api.errors import InvalidInput
from archive_api.routes import search as search_api
from archive_api.routes.deps import Ctx
from archive_api.routes.search import Cursor, RecordId
from archive_api.store.errors import InvalidCursor, InvalidRequest, QuerySyntaxError
from archive_api.store.query import MAX_QUERY_LENGTH
from archive_api.web.access import page
from archive_api.web.charts import DaySeries, bar_chart, day_chart
from archive_api.web.rendering import WEB_PREFIX, Renderer, is_htmx, url

SEARCH_PAGE_SIZE: Final = 25
CONVERSATION_PAGE_SIZE: Final = 100

SYNTAX_HELP: Final = (
    ("word", "messages containing the word (case and accents ignored); word* for a prefix"),
    ('"a phrase"', "the words in this order"),
    ("-word", "leave out what matches (any term can be negated)"),
    ("from:alice@corp.example", "sent by; also a full JID with /resource"),
    ("to:*@partner.example", "sent to anyone at that domain"),
    ("with:bob@partner.example", "either side of the conversation"),
    ("room:desk@conference.corp.example", "in a room (*@service for every room)"),
    ("after:2026-01-01 before:2026-02-01", "time window, after inclusive, before exclusive"),
    ("type:chat", "chat, groupchat, normal, headline, subscription, report, session, call, file"),
    ("verdict:quarantine", "allow, flag, quarantine, reject, drop"),
    ("has:attachment  has:encrypted", "with a file; end-to-end encrypted"),
    ("is:edited  is:retracted", "corrected or retracted messages"),
)


@dataclass(frozen=True, slots=True)
class SyntaxProblem:
    """A query that did not parse, split around the offending character for display."""

    message: str
    position: int
    before: str
    at: str
    after: str

    @classmethod
    def of(cls, exc: QuerySyntaxError, text: str) -> SyntaxProblem:
        pos = max(0, min(exc.position, len(text)))
        return cls(exc.message, pos, text[:pos], text[pos : pos + 1] or " ", text[pos + 1 :])


def _refine(query: str, term: str) -> str:
    return f"{query.strip()} {term}".strip()


def facet_links(query: str, facets: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each facet value with the search that narrows to it."""
    links: dict[str, list[dict[str, Any]]] = {"verdict": [], "remote_domain": [], "day": []}
    for item in facets.get("verdict", []):
        refined = _refine(query, f"verdict:{item['value']}")
        links["verdict"].append({**item, "href": url(f"{WEB_PREFIX}/search", q=refined)})
    for item in facets.get("remote_domain", []):
        value = str(item["value"])
        term = f"with:*@{value}" if value and " " not in value and '"' not in value else None
        href = url(f"{WEB_PREFIX}/search", q=_refine(query, term)) if term else None
        links["remote_domain"].append({**item, "href": href})
    for item in facets.get("day", []):
        day = date.fromisoformat(item["value"])
        refined = _refine(
            query, f"after:{day.isoformat()} before:{(day + timedelta(1)).isoformat()}"
        )
        links["day"].append({**item, "href": url(f"{WEB_PREFIX}/search", q=refined)})
    return links


def conversation_link(record: dict[str, Any]) -> str | None:
    """The conversation view around a record: its room, or its two parties, that day."""
    occurred = datetime.fromisoformat(record["occurred_at"]).date()
    window = {"after": occurred.isoformat(), "before": (occurred + timedelta(1)).isoformat()}
    if record.get("room"):
        return url(f"{WEB_PREFIX}/conversations", {"room": record["room"], **window})
    sender, recipient = record.get("sender"), record.get("recipient")
    if sender and recipient and sender != recipient:
        return url(f"{WEB_PREFIX}/conversations", {"with": [sender, recipient], **window})
    return None


# The message view lists these first, in this order; every other field follows.
RECORD_FIELDS: Final = (
    ("record_id", "Record id"),
    ("occurred_at", "Time"),
    ("kind", "Kind"),
    ("type", "Type"),
    ("direction", "Direction"),
    ("sender_full", "From"),
    ("recipient_full", "To"),
    ("room", "Room"),
    ("remote_domain", "Remote domain"),
    ("status", "Status"),
    ("subject", "Subject"),
    ("thread", "Thread"),
    ("message_id", "Message id"),
    ("origin_id", "Origin id"),
    ("encryption", "Encryption"),
    ("replaces_id", "Corrects"),
    ("retracts_id", "Retracts"),
    ("delay_stamp", "Delayed from"),
    ("client_address", "Client address"),
    ("reported_jid", "Reported JID"),
    ("report_reason", "Report reason"),
    ("report_text", "Report text"),
    ("sender", "Sender (bare)"),
    ("recipient", "Recipient (bare)"),
)
_SHOWN_APART: Final = frozenset(
    {
        "body",
        "raw_xml",
        "raw_base64",
        "verdict",
        "observations",
        "attachments",
        "stanza_ids",
        "stanza_type",  # shown as "Type"
    }
)


def record_fields(record: dict[str, Any]) -> list[tuple[str, Any]]:
    known = dict(RECORD_FIELDS)
    fields = [(label, record.get(key)) for key, label in RECORD_FIELDS if key in record]
    extra = [
        (key.replace("_", " ").capitalize(), value)
        for key, value in record.items()
        if key not in known and key not in _SHOWN_APART
    ]
    return fields + extra


def add_archive_routes(router: APIRouter, renderer: Renderer) -> None:
    @router.get(f"{WEB_PREFIX}/dashboard", include_in_schema=False)
    async def dashboard_page(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(page(Permission.DASHBOARD))],
        days: Annotated[int | None, Query(ge=1, le=366)] = None,
    ) -> Response:
        span = min(days or ctx.config.dashboard_days, ctx.config.max_dashboard_days)
        figures = await dashboard(ctx.store, ctx.clock, days=span, top=10)
        day_list = [d.day for d in figures.days]
        per_day = day_chart(
            day_list,
            (
                DaySeries("messages", [d.messages for d in figures.days]),
                DaySeries("blocked", [d.blocked for d in figures.days]),
                DaySeries("quarantined", [d.quarantined for d in figures.days]),
            ),
            title=f"Messages, blocked and quarantined per day, last {span} days",
        )
        return renderer.page(
            request,
            "dashboard.html",
            title="Dashboard",
            figures=figures.to_json(),
            span=span,
            per_day_chart=per_day,
            domains_chart=bar_chart(
                figures.top_blocked_domains, title="Top blocked remote domains", chart_id="domains"
            ),
            rules_chart=bar_chart(figures.top_rules, title="Top rules fired", chart_id="rules"),
        )

    async def run_search(
        ctx: Ctx, identity: Identity, q: str, sort: Literal["time", "relevance"], cursor: str | None
    ) -> tuple[dict[str, Any] | None, SyntaxProblem | None, str | None]:
        try:
            result = await search_api.search(
                ctx, identity, q=q, sort=sort, cursor=cursor, limit=SEARCH_PAGE_SIZE, facets=None
            )
        except QuerySyntaxError as exc:
            return None, SyntaxProblem.of(exc, q), None
        except (InvalidCursor, InvalidRequest) as exc:
            return None, None, str(exc)
        return result, None, None

    @router.get(f"{WEB_PREFIX}/search", include_in_schema=False)
    async def search_page(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(page(Permission.SEARCH))],
        q: Annotated[str | None, Query(max_length=MAX_QUERY_LENGTH * 4)] = None,
        sort: Annotated[Literal["time", "relevance"], Query()] = "time",
        cursor: Cursor = None,
    ) -> Response:
        result = syntax = error = None
        if q is not None:
            result, syntax, error = await run_search(ctx, identity, q, sort, cursor)
        status = 400 if syntax is not None or error is not None else 200
        return renderer.page(
            request,
            "search.html",
            title="Search",
            status=status,
            q=q or "",
            sort=sort,
            cursor=cursor,
            result=result,
            facets=facet_links(q or "", result["facets"])
            if result and "facets" in result
            else None,
            syntax=syntax,
            error=error,
            syntax_help=SYNTAX_HELP,
        )

    @router.get(f"{WEB_PREFIX}/search/more", include_in_schema=False)
    async def search_more(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(page(Permission.SEARCH))],
        q: Annotated[str, Query(max_length=MAX_QUERY_LENGTH * 4)],
        cursor: Annotated[str, Query(min_length=1, max_length=1000)],
        sort: Annotated[Literal["time", "relevance"], Query()] = "time",
    ) -> Response:
        """The next page of results, as list items for htmx to append (a whole page when
        the browser asked without htmx)."""
        result, syntax, error = await run_search(ctx, identity, q, sort, cursor)
        if not is_htmx(request):
            return renderer.page(
                request,
                "search.html",
                title="Search",
                status=200 if result is not None else 400,
                q=q,
                sort=sort,
                cursor=cursor,
                result=result,
                facets=None,
                syntax=syntax,
                error=error,
                syntax_help=SYNTAX_HELP,
            )
        return renderer.fragment(
            request,
            "search_more.html",
            status=200 if result is not None else 400,
            q=q,
            sort=sort,
            result=result,
            error=error or (syntax.message if syntax else None),
        )

    @router.get(f"{WEB_PREFIX}/messages/{{record_id}}", include_in_schema=False)
    async def message_page(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(page(Permission.VIEW))],
        record_id: RecordId,
    ) -> Response:
        data = await search_api.message(ctx, identity, record_id)
        record = data["record"]
        return renderer.page(
            request,
            "message.html",
            title=f"Message {record_id}",
            data=data,
            record=record,
            fields=record_fields(record),
            conversation_href=conversation_link(record),
            can_review=identity.can(Permission.REVIEW),
            can_hold=identity.can(Permission.HOLD_CREATE),
        )

    async def run_conversation(
        ctx: Ctx,
        identity: Identity,
        parties: list[str] | None,
        room: str | None,
        after: str | None,
        before: str | None,
        cursor: str | None,
    ) -> tuple[dict[str, Any] | None, str | None]:
        try:
            result = await search_api.conversation(
                ctx,
                identity,
                with_=parties,
                room=room,
                after=after,
                before=before,
                cursor=cursor,
                limit=CONVERSATION_PAGE_SIZE,
            )
        except (InvalidInput, InvalidRequest, InvalidCursor) as exc:
            return None, str(exc)
        return result, None

    @router.get(f"{WEB_PREFIX}/conversations", include_in_schema=False)
    async def conversation_page(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(page(Permission.VIEW))],
        with_: Annotated[list[str] | None, Query(alias="with", max_length=2)] = None,
        room: Annotated[str | None, Query(max_length=3100)] = None,
        after: Annotated[str | None, Query(max_length=64)] = None,
        before: Annotated[str | None, Query(max_length=64)] = None,
        cursor: Cursor = None,
    ) -> Response:
        parties = [p.strip() for p in with_ or [] if p.strip()] or None
        room = (room or "").strip() or None
        after, before = (after or "").strip() or None, (before or "").strip() or None
        result = error = None
        if parties is not None or room is not None:
            result, error = await run_conversation(
                ctx, identity, parties, room, after, before, cursor
            )
        form = {
            "parties": [*(parties or []), "", ""],
            "room": room or "",
            "after": after or "",
            "before": before or "",
        }
        more = None
        if result is not None and result["next_cursor"]:
            more = url(
                f"{WEB_PREFIX}/conversations",
                {"with": parties or []},
                room=room,
                after=after,
                before=before,
                cursor=result["next_cursor"],
            )
        return renderer.page(
            request,
            "conversation.html",
            title="Conversation",
            status=400 if error else 200,
            form=form,
            result=result,
            error=error,
            more=more,
            continued=cursor is not None,
        )
