"""The web UI's pages over ASGI (httpx): who may open what, sign-in and sessions, CSRF,
escaping of hostile archive content, forms, htmx fragments and the audit trail they leave.

The app is the real composition (tests/archive_api/web/support.py): real SQLite archive fed
through the real spool, the real quarantine service behind the review buttons, the real
policy store. Clients sign in through the sign-in form like a browser.
"""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from fastapi import routing

from archive_api.audit import AuditOutcome
from archive_api.auth import ROLE_PERMISSIONS, SESSION_COOKIE, Permission, Role
from archive_api.routes.deps import route_permission
from archive_api.store.audit import AuditEvent
from archive_api.store.query import MAX_QUERY_LENGTH
from archive_api.store.records import RecordStatus
from archive_api.web import WEB_PREFIX
from archive_api.web.csrf import SIGN_IN_COOKIE, session_csrf_token
from archive_api.web.rendering import NAVIGATION, Renderer
from tests.archive_api.api_support import OPERATOR, ROLES
from tests.archive_api.store.conformance import record
from tests.archive_api.web.support import (
    HOSTILE_BODY,
    HOSTILE_RESOURCE,
    HOSTILE_RULE_DETAIL,
    WebEnv,
    client_for,
    csrf_of,
    signed_in,
    web_env,
)

# Every page and the one permission it needs (the API route it mirrors needs the same).
PAGES: list[tuple[str, Permission, str]] = [
    ("/ui/dashboard", Permission.DASHBOARD, "Dashboard"),
    ("/ui/search", Permission.SEARCH, "Search the archive"),
    ("/ui/search?q=guarantee", Permission.SEARCH, "2 records match"),
    ("/ui/messages/r-alice-1", Permission.VIEW, "Chain proof"),
    ("/ui/conversations?room=desk%40conference.corp.example", Permission.VIEW, "morning desk"),
    ("/ui/review", Permission.REVIEW, "cheap pills"),
    ("/ui/review?queue=flagged", Permission.REVIEW, "guaranteed profit"),
    ("/ui/holds", Permission.HOLD_READ, "Legal holds"),
    ("/ui/exports", Permission.EXPORT, "Export jobs"),
    ("/ui/policy", Permission.POLICY_READ, "Policy document (TOML)"),
    ("/ui/audit", Permission.AUDIT_READ, "Audit log"),
    ("/ui/audit/verify", Permission.AUDIT_VERIFY, "Verify the audit log"),
]
PUBLIC_UI_PATHS = {"/", "/ui", "/ui/", "/ui/sign-in", "/ui/sign-out", "/ui/static/{name}"}
SignIn = Callable[[Role], Awaitable[tuple[httpx.AsyncClient, str]]]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[WebEnv]:
    async with web_env(tmp_path) as made:
        yield made


@pytest.fixture
async def anonymous(env: WebEnv) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(env) as client:
        yield client


@pytest.fixture
async def sign_in(env: WebEnv) -> AsyncIterator[SignIn]:
    """Sign a fresh client in as a role; returns it and its CSRF token."""
    opened: list[httpx.AsyncClient] = []

    async def make(role: Role) -> tuple[httpx.AsyncClient, str]:
        client = client_for(env)
        opened.append(client)
        return client, await signed_in(client, env.secrets[role])

    yield make
    for client in opened:
        await client.aclose()


async def events(env: WebEnv) -> list[AuditEvent]:
    await env.ctx.audit.flush()
    page = await env.store.audit_events(newest_first=False, limit=1000)
    return list(page.events)


# --- who may open what ----------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES, ids=str)
async def test_each_page_renders_for_its_roles_and_is_refused_to_the_others(
    sign_in: SignIn, role: Role
) -> None:
    client, _ = await sign_in(role)
    for path, permission, text in PAGES:
        answer = await client.get(path)
        if permission in ROLE_PERMISSIONS[role]:
            assert answer.status_code == 200, (path, answer.text[:500])
            assert text in answer.text, path
        else:
            assert answer.status_code == 403, path
            assert answer.headers["content-type"].startswith("text/html")
            assert "Not allowed" in answer.text and permission.value in answer.text, path


@pytest.mark.parametrize("role", ROLES, ids=str)
async def test_navigation_shows_only_what_the_role_may_use(sign_in: SignIn, role: Role) -> None:
    client, _ = await sign_in(role)
    page = (await client.get("/ui/dashboard")).text
    nav = page[page.index('<nav aria-label="Sections">') : page.index("</nav>")]
    for item in NAVIGATION:
        assert (f'href="{item.path}"' in nav) == (item.permission in ROLE_PERMISSIONS[role])


async def test_every_ui_route_declares_one_permission_or_is_public(env: WebEnv) -> None:
    flatten = getattr(routing, "iter_route_contexts", None)
    routes = list(flatten(env.service.app.routes) if flatten else env.service.app.routes)
    seen = set()
    for route in routes:
        path = getattr(route, "path", "")
        if path != "/" and not path.startswith(WEB_PREFIX):
            continue
        seen.add(path)
        dependant = getattr(route, "dependant", None)
        permissions = route_permission(dependant.dependencies) if dependant else []
        if path in PUBLIC_UI_PATHS:
            assert permissions == [], path
        else:
            assert len(permissions) == 1, (path, permissions)
    assert seen >= PUBLIC_UI_PATHS and len(seen) > len(PUBLIC_UI_PATHS) + 10


async def test_signed_out_pages_send_the_browser_to_sign_in(
    env: WebEnv, anonymous: httpx.AsyncClient
) -> None:
    for path, _, _ in PAGES:
        answer = await anonymous.get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/ui/sign-in?next=%2Fui%2F"), path
    htmx = await anonymous.get("/ui/search", headers={"HX-Request": "true"})
    assert htmx.status_code == 401 and htmx.headers["HX-Redirect"] == "/ui/sign-in"
    assert (await anonymous.get("/")).headers["location"] == "/ui/dashboard"


# --- sign-in, sessions, sign-out ------------------------------------------------------------


async def test_sign_in_sets_a_strict_session_cookie_and_is_audited(
    env: WebEnv, anonymous: httpx.AsyncClient
) -> None:
    form = await anonymous.get("/ui/sign-in")
    nonce_cookie = form.headers["set-cookie"]
    assert SIGN_IN_COOKIE in nonce_cookie and "HttpOnly" in nonce_cookie
    assert "SameSite=strict" in nonce_cookie and "Secure" in nonce_cookie
    answer = await anonymous.post(
        "/ui/sign-in",
        data={
            "token": env.secrets[Role.OFFICER],
            "csrf_token": csrf_of(form.text),
            "next": "/ui/search?q=lunch",
        },
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/search?q=lunch"
    session = next(c for c in answer.headers.get_list("set-cookie") if SESSION_COOKIE in c)
    for attribute in ("HttpOnly", "SameSite=strict", "Secure", "Path=/", "Max-Age=28800"):
        assert attribute in session
    assert env.secrets[Role.OFFICER] not in answer.text + session
    login = [e for e in await events(env) if e.action == "login"]
    assert [(e.actor, e.outcome) for e in login] == [("token:officer-1", "ok")]
    assert env.secrets[Role.OFFICER] not in str(login[0].params)


async def test_development_over_plain_http_drops_secure(tmp_path: Path) -> None:
    async with web_env(tmp_path, environment="development", seed=False) as env:
        transport = httpx.ASGITransport(app=env.service.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            form = await client.get("/ui/sign-in")
            assert "Secure" not in form.headers["set-cookie"]
            answer = await client.post(
                "/ui/sign-in",
                data={"token": env.secrets[Role.ADMIN], "csrf_token": csrf_of(form.text)},
            )
            assert answer.status_code == 303
            assert "Secure" not in answer.headers["set-cookie"]


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "no API token given"),
        ("not-a-token", "not a StanzaGuard API token"),
        ("sg_" + "A" * 43, "unknown API token"),
        ("sg_" + "A" * 5000, "too long"),
        ("<script>alert(1)</script>", "not a StanzaGuard API token"),
    ],
)
async def test_refused_sign_ins_say_why_and_are_audited(
    env: WebEnv, anonymous: httpx.AsyncClient, token: str, message: str
) -> None:
    form = await anonymous.get("/ui/sign-in")
    answer = await anonymous.post(
        "/ui/sign-in", data={"token": token, "csrf_token": csrf_of(form.text)}
    )
    assert answer.status_code == 401
    assert message in answer.text
    assert SESSION_COOKIE not in answer.headers.get("set-cookie", "")
    assert "<script>alert(1)" not in answer.text
    denied = [e for e in await events(env) if e.action == "login"]
    assert [(e.actor, e.outcome) for e in denied] == [("anonymous", AuditOutcome.DENIED.value)]


async def test_sign_in_form_needs_its_nonce(env: WebEnv, anonymous: httpx.AsyncClient) -> None:
    await anonymous.get("/ui/sign-in")
    forged = await anonymous.post(
        "/ui/sign-in", data={"token": env.secrets[Role.ADMIN], "csrf_token": "guess"}
    )
    assert forged.status_code == 403 and "did not come from this service" in forged.text
    anonymous.cookies.clear()
    no_cookie = await anonymous.post(
        "/ui/sign-in", data={"token": env.secrets[Role.ADMIN], "csrf_token": ""}
    )
    assert no_cookie.status_code == 403
    form = await anonymous.get("/ui/sign-in")
    cross_site = await anonymous.post(
        "/ui/sign-in",
        data={"token": env.secrets[Role.ADMIN], "csrf_token": csrf_of(form.text)},
        headers={"Origin": "https://evil.example"},
    )
    assert cross_site.status_code == 403
    assert not [e for e in await events(env) if e.action == "login"]


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example/",
        "//evil.example/ui/",
        "/ui\\..\\evil",
        "/api/v1/search",
        "/ui/sign-in",
        "/ui/x\r\nSet-Cookie: a=b",
        "javascript:alert(1)",
    ],
)
async def test_sign_in_never_redirects_off_the_ui(
    env: WebEnv, anonymous: httpx.AsyncClient, target: str
) -> None:
    form = await anonymous.get("/ui/sign-in")
    answer = await anonymous.post(
        "/ui/sign-in",
        data={"token": env.secrets[Role.ADMIN], "csrf_token": csrf_of(form.text), "next": target},
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/dashboard"


async def test_a_signed_in_visit_to_sign_in_goes_on(sign_in: SignIn) -> None:
    client, _ = await sign_in(Role.OFFICER)
    answer = await client.get("/ui/sign-in?next=/ui/holds")
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/holds"


async def test_sign_out_ends_the_session_and_is_audited(env: WebEnv, sign_in: SignIn) -> None:
    client, csrf = await sign_in(Role.OFFICER)
    refused = await client.post("/ui/sign-out", data={"csrf_token": "wrong"})
    assert refused.status_code == 403
    answer = await client.post("/ui/sign-out", data={"csrf_token": csrf})
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/sign-in"
    assert f'{SESSION_COOKIE}=""' in answer.headers["set-cookie"]
    assert (await client.get("/ui/dashboard")).status_code == 303
    assert [e.actor for e in await events(env) if e.action == "logout"] == ["token:officer-1"]


async def test_revoking_the_token_ends_its_ui_sessions(env: WebEnv, sign_in: SignIn) -> None:
    client, _ = await sign_in(Role.OFFICER)
    await env.ctx.tokens.revoke(OPERATOR, "officer-1")
    answer = await client.get("/ui/search")
    assert answer.status_code == 303 and answer.headers["location"].startswith("/ui/sign-in")
    assert f'{SESSION_COOKIE}=""' in answer.headers["set-cookie"]


async def test_a_forged_session_cookie_is_refused(
    env: WebEnv, anonymous: httpx.AsyncClient
) -> None:
    for value in ("1.e30.AAAA", "x" * 5000, "1.<script>.x", "\u00e9t\u00e9"):
        anonymous.cookies.set(SESSION_COOKIE, value.encode("ascii", "replace").decode())
        answer = await anonymous.get("/ui/holds")
        assert answer.status_code == 303, value


# --- CSRF -------------------------------------------------------------------------------------


async def test_forms_without_the_session_token_are_refused(env: WebEnv, sign_in: SignIn) -> None:
    client, csrf = await sign_in(Role.ADMIN)
    env.clock.advance(1)  # a later sign-in with the same token: another session
    _, other_csrf = await sign_in(Role.ADMIN)
    assert other_csrf != csrf
    hold = {"case_name": "Forged", "kind": "person", "jid": "alice@corp.example"}
    for token in (None, "", "x" * 300, other_csrf, csrf[:-1] + ("A" if csrf[-1] != "A" else "B")):
        data = dict(hold) if token is None else {**hold, "csrf_token": token}
        answer = await client.post("/ui/holds", data=data)
        assert answer.status_code == 403, token
        assert "did not come from this service" in answer.text
    decisions = await client.post("/ui/review/r-held/release", data={"csrf_token": other_csrf})
    assert decisions.status_code == 403
    policy = await client.post("/ui/policy", data={"text": "version = 1\n", "csrf_token": ""})
    assert policy.status_code == 403
    assert await env.ctx.holds.list() == ()
    held = await env.store.get("r-held")
    assert held is not None and held.status is RecordStatus.HELD
    # the right token in the form, or in the header htmx sends, is accepted
    assert (await client.post("/ui/holds", data={**hold, "csrf_token": csrf})).status_code == 303
    header = await client.post("/ui/holds", data=hold, headers={"X-CSRF-Token": csrf})
    assert header.status_code == 303
    assert len(await env.ctx.holds.list()) == 2


async def test_the_csrf_token_is_bound_to_the_session(env: WebEnv, sign_in: SignIn) -> None:
    client, csrf = await sign_in(Role.OFFICER)
    assert csrf == session_csrf_token(client.cookies[SESSION_COOKIE])
    assert env.secrets[Role.OFFICER] not in csrf


async def test_a_cross_site_post_is_refused_even_with_the_token(sign_in: SignIn) -> None:
    client, csrf = await sign_in(Role.OFFICER)
    answer = await client.post(
        "/ui/holds",
        data={"csrf_token": csrf, "case_name": "x", "kind": "person", "jid": "a@b.example"},
        headers={"Origin": "https://evil.example"},
    )
    assert answer.status_code == 303 and answer.headers["location"].startswith("/ui/sign-in")


# --- hostile content --------------------------------------------------------------------------


def assert_inert(html: str) -> None:
    """No markup from the archive made it into the page as markup."""
    for raw in (
        '<script>alert("body")',
        "<img src=x",
        "<script>alert('resource')",
        "<b onmouseover",
        "<i>subject</i>",
    ):
        assert raw not in html
    assert len(re.findall(r"<script\b", html)) == 1  # htmx, and nothing else


async def test_hostile_bodies_jids_and_reasons_are_shown_as_text(sign_in: SignIn) -> None:
    client, _ = await sign_in(Role.OFFICER)
    escaped_body = html.escape(HOSTILE_BODY).replace("&quot;", "&#34;").replace("&#x27;", "&#39;")
    pages = {
        "/ui/messages/r-hostile": [
            escaped_body,
            "&lt;script&gt;alert(&#39;resource&#39;)",
            "&lt;i&gt;subject&lt;/i&gt;",
        ],
        "/ui/search?q=alert": ["&lt;script&gt;"],
        "/ui/review": [
            escaped_body[:40],
            "&lt;b onmouseover=&#34;alert(3)&#34;&gt;bold claim&lt;/b&gt;",
        ],
        "/ui/conversations?with=mallory%40evil.example&with=alice%40corp.example": [escaped_body],
        "/ui/search?q=from%3Amallory%40evil.example": ["mallory@evil.example"],
    }
    for path, expected in pages.items():
        answer = await client.get(path)
        assert answer.status_code == 200, path
        assert_inert(answer.text)
        for text in expected:
            assert text in answer.text, (path, text)
    raw = (await client.get("/ui/messages/r-hostile")).text
    assert (
        "&lt;message to=&#39;alice@corp.example&#39;&gt;&lt;body&gt;&amp;lt;script&amp;gt;" in raw
    )
    assert (
        HOSTILE_BODY not in raw and HOSTILE_RESOURCE not in raw and HOSTILE_RULE_DETAIL not in raw
    )


async def test_hostile_query_text_and_form_input_are_echoed_as_text(sign_in: SignIn) -> None:
    client, csrf = await sign_in(Role.OFFICER)
    answer = await client.get("/ui/search", params={"q": '"><script>alert(1)</script> from:'})
    assert answer.status_code == 400
    assert "<script>alert(1)" not in answer.text
    assert "&#34;&gt;&lt;script&gt;" in answer.text
    hold = await client.post(
        "/ui/holds",
        data={
            "csrf_token": csrf,
            "case_name": "<b>x</b>",
            "kind": "person",
            "jid": "<svg onload=x>",
        },
    )
    assert hold.status_code == 400
    assert "<svg onload" not in hold.text and "&lt;svg onload=x&gt;" in hold.text


async def test_pages_forbid_inline_script_and_other_origins(sign_in: SignIn) -> None:
    client, _ = await sign_in(Role.OFFICER)
    answer = await client.get("/ui/messages/r-hostile")
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert "unsafe" not in policy
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in policy
    for url in re.findall(r'(?:src|href)="([^"#]+)"', answer.text):
        assert url.startswith("/"), url


# --- search, message and conversation views ---------------------------------------------------


async def test_search_shows_marked_snippets_facets_and_audits(env: WebEnv, sign_in: SignIn) -> None:
    client, _ = await sign_in(Role.OFFICER)
    answer = await client.get("/ui/search", params={"q": "guarantee"})
    assert answer.status_code == 200
    assert "<mark>guarantee</mark>" in answer.text
    assert "Narrow down" in answer.text and "partner.example" in answer.text
    search = [e for e in await events(env) if e.action == "search"]
    assert search[-1].actor == "token:officer-1" and search[-1].result_count == 2
    assert search[-1].params["q"] == "guarantee"


async def test_query_errors_point_at_the_character(sign_in: SignIn) -> None:
    client, _ = await sign_in(Role.OFFICER)
    answer = await client.get("/ui/search", params={"q": "lunch verdict:maybe"})
    assert answer.status_code == 400
    assert "at character 15" in answer.text
    assert "<pre>lunch verdict:<mark>m</mark>aybe</pre>" in answer.text


async def test_oversized_and_malformed_parameters_are_refused_cleanly(sign_in: SignIn) -> None:
    client, _ = await sign_in(Role.OFFICER)
    for path, params in [
        ("/ui/search", {"q": "x" * (MAX_QUERY_LENGTH * 4 + 1)}),
        ("/ui/search", {"q": "a", "sort": "sideways"}),
        ("/ui/messages/..%2F..%2Fetc", {}),
        ("/ui/messages/" + "a" * 200, {}),
        ("/ui/dashboard", {"days": "0"}),
        ("/ui/dashboard", {"days": "99999"}),
        ("/ui/exports/exp-nothex", {}),
    ]:
        answer = await client.get(path, params=params)
        assert 400 <= answer.status_code < 500, (path, answer.status_code)
        assert answer.headers["content-type"].startswith("text/html"), path
    bad_cursor = await client.get("/ui/search", params={"q": "guarantee", "cursor": "garbage"})
    assert bad_cursor.status_code == 400 and "flash error" in bad_cursor.text
    missing = await client.get("/ui/messages/nope-404")
    assert missing.status_code == 404 and "Not found" in missing.text


async def test_load_more_returns_list_items_for_htmx(env: WebEnv, sign_in: SignIn) -> None:
    await env.add_records(*(record(f"r-more-{n:02d}", body=f"memo {n}") for n in range(30)))
    client, _ = await sign_in(Role.OFFICER)
    first = await client.get("/ui/search", params={"q": "memo", "sort": "time"})
    assert first.text.count('class="open-message"') == 25
    cursor_match = re.search(r'hx-get="/ui/search/more\?([^"]+)"', first.text)
    assert cursor_match is not None
    more_url = "/ui/search/more?" + cursor_match.group(1).replace("&amp;", "&")
    fragment = await client.get(more_url, headers={"HX-Request": "true"})
    assert fragment.status_code == 200
    assert fragment.text.count('class="open-message"') == 5
    assert "No more results." in fragment.text
    assert "<html" not in fragment.text and fragment.text.lstrip().startswith("<li>")
    assert 'id="load-more" hx-swap-oob="true"' in fragment.text
    assert "autofocus" in fragment.text
    whole = await client.get(more_url)  # without htmx: a whole page
    assert "<html" in whole.text


async def test_message_view_shows_everything_and_is_audited(env: WebEnv, sign_in: SignIn) -> None:
    client, _ = await sign_in(Role.OFFICER)
    page = (await client.get("/ui/messages/r-alice-2")).text
    for text in (
        "r-alice-2",
        "alice@corp.example/phone",
        "id-r-alice-1",  # what it corrects
        "we guarantee a return on this deal",  # the original, in the edit history
        "verified",
        "checkpoint-signature",
        "&lt;message id=&#39;id-r-alice-2&#39;/&gt;",
        "live",  # an observation
    ):
        assert text in page, text
    view = [e for e in await events(env) if e.action == "view"]
    assert view[-1].params == {"record_id": "r-alice-2"} and view[-1].result_count == 1


async def test_conversation_view_shows_edits_and_checks_its_window(
    env: WebEnv, sign_in: SignIn
) -> None:
    client, _ = await sign_in(Role.OFFICER)
    page = await client.get(
        "/ui/conversations",
        params=[
            ("with", "alice@corp.example"),
            ("with", "bob@partner.example"),
            ("after", "2026-01-15"),
        ],
    )
    assert page.status_code == 200
    assert "edited" in page.text and "later retracted by the sender" in page.text
    bad = await client.get(
        "/ui/conversations", params={"room": "desk@conference.corp.example", "after": "yesterday"}
    )
    assert bad.status_code == 400 and "is not a date" in bad.text
    both = await client.get(
        "/ui/conversations", params={"room": "desk@conference.corp.example", "with": "a@b.example"}
    )
    assert both.status_code == 400
    assert [e.outcome for e in await events(env) if e.action == "conversation"] == [
        "ok",
        "invalid",
        "invalid",
    ]


# --- holds, exports, review, policy, audit -------------------------------------------------------


async def test_holds_are_placed_by_officers_and_released_by_admins(
    env: WebEnv, sign_in: SignIn
) -> None:
    officer, officer_csrf = await sign_in(Role.OFFICER)
    placed = await officer.post(
        "/ui/holds",
        data={
            "csrf_token": officer_csrf,
            "case_name": "Desk review",
            "kind": "conversation",
            "room": "desk@conference.corp.example",
            "after": "2026-01-01",
        },
    )
    assert placed.status_code == 303
    listing = await officer.get(placed.headers["location"])
    assert "Legal hold hold-" in listing.text and "Desk review" in listing.text
    assert "Release hold" not in listing.text
    (hold,) = await env.ctx.holds.list()
    assert str(hold.query) == "room:desk@conference.corp.example after:2026-01-01"
    refused = await officer.post(
        f"/ui/holds/{hold.hold_id}/release", data={"csrf_token": officer_csrf}
    )
    assert refused.status_code == 403

    admin, admin_csrf = await sign_in(Role.ADMIN)
    released = await admin.post(
        f"/ui/holds/{hold.hold_id}/release", data={"csrf_token": admin_csrf, "reason": "closed"}
    )
    assert released.status_code == 303
    again = await admin.post(
        f"/ui/holds/{hold.hold_id}/release", data={"csrf_token": admin_csrf, "reason": "again"}
    )
    assert again.status_code == 409 and "flash error" in again.text
    actions = [(e.action, e.outcome) for e in await events(env) if e.action.startswith("hold")]
    assert actions == [
        ("hold", "ok"),
        ("hold-release", "denied"),
        ("hold-release", "ok"),
        ("hold-release", "invalid"),
    ]


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"kind": "person", "jid": "alice@corp.example/phone"}, "not a full JID"),
        ({"kind": "person", "jid": ""}, "not a JID"),
        ({"kind": "search", "query": "verdict:maybe"}, "search query"),
        ({"kind": "conversation", "participant": ["a@corp.example"]}, "at least 2"),
        ({"kind": "conversation", "room": "r@c.example", "after": "soon"}, "not a date"),
        ({"kind": "person", "jid": "a@b.example", "case_name": ""}, "case_name"),
    ],
)
async def test_bad_hold_forms_come_back_with_the_reason(
    env: WebEnv, sign_in: SignIn, form: dict[str, object], message: str
) -> None:
    client, csrf = await sign_in(Role.OFFICER)
    data = {"csrf_token": csrf, "case_name": "Case", **form}
    answer = await client.post("/ui/holds", data=data)
    assert answer.status_code == 400
    assert message in answer.text
    assert await env.ctx.holds.list() == ()


async def test_oversized_form_fields_are_refused(env: WebEnv, sign_in: SignIn) -> None:
    client, csrf = await sign_in(Role.OFFICER)
    answer = await client.post(
        "/ui/holds",
        data={"csrf_token": csrf, "case_name": "x" * 5000, "kind": "person", "jid": "a@b.example"},
    )
    assert answer.status_code == 422
    assert await env.ctx.holds.list() == ()


async def test_export_progress_and_download(env: WebEnv, sign_in: SignIn) -> None:
    client, csrf = await sign_in(Role.OFFICER)
    started = await client.post(
        "/ui/exports",
        data={"csrf_token": csrf, "source": "query", "query": "guarantee", "format": "jsonl"},
    )
    assert started.status_code == 303
    job_path = started.headers["location"]
    job_id = job_path.rsplit("/", 1)[1]
    done = await env.ctx.export_jobs.wait(job_id)  # type: ignore[union-attr]
    assert done.state.value == "done"
    fragment = await client.get(f"{job_path}/progress", headers={"HX-Request": "true"})
    assert "hx-trigger" not in fragment.text  # finished: polling stops
    assert "records.jsonl" in fragment.text
    download = await client.get(f"{job_path}/files/records.jsonl")
    assert download.status_code == 200 and download.text.count("\n") == 2
    assert "attachment" in download.headers["content-disposition"]
    escape = await client.get(f"{job_path}/files/..%2F..%2Fjob.json")
    assert escape.status_code == 404
    exports = [e for e in await events(env) if e.action == "export"]
    assert [(e.params.get("download", False), e.outcome) for e in exports] == [
        (False, "ok"),
        (True, "ok"),
        (True, "invalid"),
    ]
    bad = await client.post(
        "/ui/exports",
        data={"csrf_token": csrf, "source": "query", "query": "from:", "format": "csv"},
    )
    assert bad.status_code == 400 and "search query" in bad.text
    odd = await client.post(
        "/ui/exports", data={"csrf_token": csrf, "source": "query", "query": "", "format": "exe"}
    )
    assert odd.status_code == 400


def test_a_running_export_polls_and_a_finished_one_stops() -> None:
    template = Renderer().env.get_template("export_progress.html")
    job = {"job_id": "exp-0123456789abcdef", "state": "running", "written": 5, "total": 9}
    running = template.render(job=job, running=True)
    assert 'hx-trigger="every 1s"' in running and 'value="5"' in running and "of 9" in running
    failed = template.render(job={**job, "state": "failed", "error": "<b>disk</b>"}, running=False)
    assert "hx-trigger" not in failed and "&lt;b&gt;disk&lt;/b&gt;" in failed


async def test_review_decisions_go_through_the_quarantine_service(
    env: WebEnv, sign_in: SignIn
) -> None:
    client, csrf = await sign_in(Role.OFFICER)
    row = await client.post(
        "/ui/review/r-held/release",
        data={"csrf_token": csrf, "queue": "quarantine"},
        headers={"HX-Request": "true"},
    )
    assert row.status_code == 200
    assert row.text.lstrip().startswith('<tr id="row-r-held">') and "Released" in row.text
    await env.indexer.drain()
    released = await env.store.get("r-held")
    assert released is not None and released.status is RecordStatus.RELEASED
    again = await client.post("/ui/review/r-held/confirm-spam", data={"csrf_token": csrf})
    assert again.status_code == 409 and "Refused" in again.text
    missing = await client.post("/ui/review/nope-404/release", data={"csrf_token": csrf})
    assert missing.status_code == 409 and "no record" in missing.text
    bad = await client.post("/ui/review/r-held/obliterate", data={"csrf_token": csrf})
    assert bad.status_code == 422
    decided = [
        (e.action, e.outcome) for e in await events(env) if e.action in ("release", "confirm-spam")
    ]
    assert decided == [("release", "ok"), ("confirm-spam", "invalid"), ("release", "invalid")]


async def test_policy_validate_save_and_conflict(env: WebEnv, sign_in: SignIn) -> None:
    client, csrf = await sign_in(Role.ADMIN)
    page = await client.get("/ui/policy")
    base = re.search(r'name="base_version" value="([^"]*)"', page.text)
    assert base is not None
    broken = "version = 1\r\n[federation]\r\nmode = \r\n"
    checked = await client.post(
        "/ui/policy/validate",
        data={"csrf_token": csrf, "text": broken},
        headers={"HX-Request": "true"},
    )
    assert checked.status_code == 200 and "line 3" in checked.text
    assert '<div id="policy-result"' in checked.text and "<html" not in checked.text
    good = 'version = 1\nlocal_domains = ["corp.example"]\n'
    valid = await client.post("/ui/policy/validate", data={"csrf_token": csrf, "text": good})
    assert "The policy is valid." in valid.text
    refused = await client.post(
        "/ui/policy", data={"csrf_token": csrf, "text": broken, "base_version": base.group(1)}
    )
    assert refused.status_code == 422 and "line 3" in refused.text
    saved = await client.post(
        "/ui/policy",
        data={
            "csrf_token": csrf,
            "text": good + "# tidy\r\n",
            "base_version": "",
            "comment": "tidy",
        },
    )
    # the file found on disk is kept as version 1, the edit becomes version 2
    assert saved.status_code == 303 and saved.headers["location"] == "/ui/policy?saved=2"
    assert env.policy_path.read_text().endswith("# tidy\n")  # CRLF from the browser undone
    listing = await client.get(saved.headers["location"])
    assert "Saved as version 2" in listing.text and "tidy" in listing.text
    stale = await client.post(
        "/ui/policy", data={"csrf_token": csrf, "text": good, "base_version": "7"}
    )
    assert stale.status_code == 409
    shown = await client.get("/ui/policy", params={"version": 1})
    assert "Version 1" in shown.text and "corp.example" in shown.text
    assert (await client.get("/ui/policy", params={"version": 9})).status_code == 404
    changes = [e.outcome for e in await events(env) if e.action == "policy-change"]
    assert changes == ["invalid", "ok", "invalid"]


async def test_audit_page_pages_filters_and_verifies(env: WebEnv, sign_in: SignIn) -> None:
    client, _ = await sign_in(Role.AUDITOR)
    page = await client.get("/ui/audit", params={"action": "login"})
    assert page.status_code == 200 and "token:auditor-1" in page.text
    bad = await client.get("/ui/audit", params={"since": "last week"})
    assert bad.status_code == 400 and "is not a date" in bad.text
    verify = await client.get(
        "/ui/audit/verify", params={"run": "true"}, headers={"HX-Request": "true"}
    )
    assert "The audit log is whole" in verify.text and "<html" not in verify.text
    actions = [e.action for e in await events(env)]
    assert "audit-read" in actions and "audit-verify" in actions


async def test_dashboard_charts_are_inline_svg(sign_in: SignIn) -> None:
    client, _ = await sign_in(Role.AUDITOR)
    page = await client.get("/ui/dashboard", params={"days": 7})
    assert page.text.count('<svg xmlns="http://www.w3.org/2000/svg"') == 3
    assert "bad.example" in page.text and "federation" in page.text
    assert 'id="total-blocked">2<' in page.text


# --- static files -----------------------------------------------------------------------------


async def test_static_files_are_served_from_the_package(anonymous: httpx.AsyncClient) -> None:
    script = await anonymous.get("/ui/static/htmx.min.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith(
        "text/javascript"
    )
    assert b"htmx" in script.content[:2000]
    style = await anonymous.get("/ui/static/style.css")
    assert style.headers["content-type"].startswith("text/css")
    cached = await anonymous.get(
        "/ui/static/style.css", headers={"If-None-Match": style.headers["etag"]}
    )
    assert cached.status_code == 304
    for name in ("..%2F__init__.py", "README.md", "htmx.LICENSE", "nope.js"):
        assert (await anonymous.get(f"/ui/static/{name}")).status_code == 404, name
