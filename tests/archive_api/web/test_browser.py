"""The web UI in a real browser: Debian's Chromium driven by Playwright.

The app runs on a real uvicorn on a loopback port (tests/archive_api/web/live.py) over a
real archive fed through the spool, with the real quarantine service behind the review
actions. Every test fails if the page asked for anything from another origin (all
requests are intercepted), logged a console error (a Content-Security-Policy violation
shows up there) or raised a script error.

Screenshots of every page go to a temporary directory, or to $STANZAGUARD_UI_SCREENSHOTS
when set (docs/ui.md lists them); each is checked for size and content, and the text it
must show is checked in the DOM.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from PIL import Image
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Playwright,
    Response,
    Route,
    ViewportSize,
    expect,
    sync_playwright,
)
from playwright.sync_api import Error as PlaywrightError

from archive_api.auth import Role
from archive_api.store.records import (
    ArchiveRecord,
    Attachment,
    Direction,
    ExchangeDetails,
    RecordKind,
    RecordStatus,
)
from tests.archive_api.api_support import T0
from tests.archive_api.store.conformance import record
from tests.archive_api.web.live import LiveServer
from tests.archive_api.web.support import HOSTILE_BODY, WebEnv
from tests.support.services import service_unavailable

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
SCREENSHOTS_ENV = "STANZAGUARD_UI_SCREENSHOTS"
PAGING_RECORDS = 30  # more than one search page (25), so "load more" has work to do
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def chromium() -> str:
    if not CHROMIUM.exists():
        service_unavailable(
            f"{CHROMIUM} is missing: install Debian's chromium (scripts/install-deps.sh)"
        )
    return str(CHROMIUM)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[LiveServer]:
    # `chromium` first: without a browser there is no point starting the service
    live = LiveServer(tmp_path_factory.mktemp("web-ui"))
    live.start()
    try:

        async def more_records(env: WebEnv) -> None:
            await env.add_records(
                *(
                    record(
                        f"r-report-{n:02d}",
                        at=T0 - timedelta(hours=n + 1),
                        body=f"quarterly report number {n}",
                    )
                    for n in range(PAGING_RECORDS)
                )
            )
            await env.checkpoint()

        live.call(more_records)
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as running:
        yield running


@pytest.fixture(scope="module")
def browser(playwright: Playwright, chromium: str) -> Iterator[Browser]:
    launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
    try:
        yield launched
    finally:
        launched.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get(SCREENSHOTS_ENV)
    if chosen:
        target = Path(chosen)
        target.mkdir(parents=True, exist_ok=True)
        return target
    return tmp_path_factory.mktemp("screenshots")


# Chrome logs this for every answer with an error status, pages included; a page answered
# 400 or 401 on purpose (a query that does not parse, a refused sign-in) is not a fault, so
# failed loads are checked by `failed_loads` instead, for everything but the page itself.
_FAILED_LOAD = "Failed to load resource: the server responded with a status of"


@dataclass
class Watch:
    """What a page did that it must not: requests elsewhere, console errors (CSP violations
    among them), script errors, and static files or htmx requests that failed."""

    origin: str
    foreign: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_loads: list[str] = field(default_factory=list)

    def console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not message.text.startswith(_FAILED_LOAD):
            self.console_errors.append(message.text)

    def response(self, response: Response) -> None:
        if response.status >= 400 and response.request.resource_type != "document":
            self.failed_loads.append(f"{response.status} {response.url}")

    def guard(self, route: Route) -> None:
        parts = urlsplit(route.request.url)
        if f"{parts.scheme}://{parts.netloc}" != self.origin:
            self.foreign.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    def check(self) -> None:
        assert self.foreign == [], f"requests to other origins: {self.foreign}"
        assert self.console_errors == [], f"console errors: {self.console_errors}"
        assert self.page_errors == [], f"script errors: {self.page_errors}"
        assert self.failed_loads == [], f"failed requests: {self.failed_loads}"


@pytest.fixture
def watch(server: LiveServer) -> Watch:
    return Watch(server.base_url)


@pytest.fixture
def context(browser: Browser, watch: Watch) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    ctx.set_default_timeout(TIMEOUT_MS)
    ctx.route("**/*", watch.guard)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: BrowserContext, watch: Watch) -> Iterator[Page]:
    opened = context.new_page()
    opened.on("console", watch.console)
    opened.on("response", watch.response)
    opened.on("pageerror", lambda exc: watch.page_errors.append(str(exc)))
    yield opened
    watch.check()


def sign_in(page: Page, server: LiveServer, role: Role, start: str = "/ui/dashboard") -> None:
    """Open a page, get sent to sign-in, paste the token, land back on the page."""
    page.goto(server.base_url + start)
    expect(page).to_have_url(f"{server.base_url}/ui/sign-in?next={start.replace('/', '%2F')}")
    page.get_by_label("API token").fill(server.env.secrets[role])
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(server.base_url + start)


def screenshot(page: Page, shots: Path, name: str, must_show: list[str]) -> Path:
    """Save a full-page screenshot and check it: expected size, not blank, text visible."""
    for text in must_show:
        expect(page.get_by_text(text, exact=False).filter(visible=True).first).to_be_visible()
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as image:
        width, height = image.size
        assert width == VIEWPORT["width"], f"{name}: {width} px wide"
        assert height >= VIEWPORT["height"], f"{name}: {height} px high"
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours is not None and len(colours) > 20, f"{name}: looks blank"
        dominant = max(count for count, _ in colours)
        assert dominant < width * height * 0.97, f"{name}: almost one colour"
    return path


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


# --- flows ------------------------------------------------------------------------------------


def test_sign_in_lands_on_the_dashboard_with_role_aware_navigation(
    page: Page, server: LiveServer, shots: Path
) -> None:
    page.goto(server.base_url + "/ui/")
    expect(page).to_have_url(f"{server.base_url}/ui/sign-in?next=%2Fui%2Fdashboard")
    screenshot(page, shots, "sign-in", ["Sign in", "API token"])
    page.get_by_label("API token").fill("sg_" + "x" * 43)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("unknown API token")

    page.get_by_label("API token").fill(server.env.secrets[Role.OFFICER])
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(server.base_url + "/ui/dashboard")
    nav = page.get_by_role("navigation", name="Sections")
    for allowed in ("Dashboard", "Search", "Review", "Holds", "Exports"):
        expect(nav.get_by_role("link", name=allowed, exact=True)).to_be_visible()
    for hidden in ("Policy", "Audit log"):
        expect(nav.get_by_role("link", name=hidden, exact=True)).to_have_count(0)
    expect(page.locator("svg[role=img]")).to_have_count(3)
    screenshot(page, shots, "dashboard", ["Dashboard", "Top blocked remote domains", "bad.example"])

    cookie = next(c for c in page.context.cookies() if c["name"] == "stanzaguard_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(server.base_url + "/ui/sign-in")
    page.goto(server.base_url + "/ui/search")
    expect(page).to_have_url(f"{server.base_url}/ui/sign-in?next=%2Fui%2Fsearch")


def test_search_load_more_and_open_a_message(page: Page, server: LiveServer, shots: Path) -> None:
    sign_in(page, server, Role.OFFICER, "/ui/search")
    page.get_by_label("Search query").fill("quarterly report")
    page.get_by_role("button", name="Search").click()
    expect(page.get_by_role("heading", name="30 records match")).to_be_visible()
    results = page.locator("#results > li")
    expect(results).to_have_count(25)
    expect(page.locator("#results mark").first).to_have_text("quarterly")
    screenshot(page, shots, "search", ["Search the archive", "30 records match", "Narrow down"])

    page.get_by_role("link", name="Load more results").click()
    expect(results).to_have_count(30)
    expect(page.get_by_text("No more results.")).to_be_visible()
    # htmx appended the rest and moved focus to the first new result (autofocus is applied
    # when the swap settles, after the new rows are in: wait for it)
    expect(results.nth(25).locator("a.open-message")).to_be_focused()

    page.get_by_label("Search query").fill("guarantee")
    page.get_by_role("button", name="Search").click()
    page.locator("#results a.open-message").first.click()
    expect(page).to_have_url(server.base_url + "/ui/messages/r-alice-2")
    expect(page.locator("#proof-status")).to_contain_text("verified")
    expect(page.locator("#raw-xml")).to_contain_text("<message id='id-r-alice-2'/>")
    screenshot(page, shots, "message", ["Chain proof", "Edit history", "Raw XML", "correction"])

    page.get_by_role("link", name="Open the conversation that day").click()
    expect(page.locator("#transcript")).to_contain_text("edited")
    screenshot(page, shots, "conversation", ["Conversation", "we guarantee a return"])


def test_hostile_content_is_shown_as_text(page: Page, server: LiveServer) -> None:
    sign_in(page, server, Role.OFFICER, "/ui/messages/r-hostile")
    expect(page.locator("#message-body")).to_have_text(HOSTILE_BODY)
    assert page.locator("#message-body script, #message-body img").count() == 0
    assert page.locator("main script").count() == 0


def test_place_a_legal_hold(page: Page, server: LiveServer, shots: Path) -> None:
    sign_in(page, server, Role.OFFICER, "/ui/holds")
    page.get_by_label("Case name").fill("SEC inquiry 2026-01")
    page.get_by_label("A person").check()
    page.get_by_label("Person: bare JID or *@domain").fill("alice@corp.example")
    page.get_by_role("button", name="Place hold").click()
    expect(page.get_by_role("status")).to_contain_text("SEC inquiry 2026-01")
    row = page.locator("#holds-table tbody tr", has_text="SEC inquiry 2026-01")
    expect(row).to_contain_text("with:alice@corp.example")
    expect(row).to_contain_text("active")
    # officers place holds but may not release them
    expect(page.get_by_role("button", name="Release hold")).to_have_count(0)
    screenshot(page, shots, "holds", ["Legal holds", "Place a legal hold", "SEC inquiry 2026-01"])

    holds = server.call(lambda env: env.ctx.holds.list(include_released=False))
    assert [h.case_name for h in holds] == ["SEC inquiry 2026-01"]


def test_release_a_quarantined_message(page: Page, server: LiveServer, shots: Path) -> None:
    sign_in(page, server, Role.OFFICER, "/ui/review")
    row = page.locator("#row-r-held")
    expect(row).to_contain_text("cheap pills")
    screenshot(page, shots, "review", ["Review", "Quarantined", "cheap pills"])
    row.get_by_role("button", name="Release").click()
    expect(page.locator("#row-r-held")).to_contain_text("Released")

    async def status(env: WebEnv) -> RecordStatus | None:
        await env.indexer.drain()
        found = await env.store.get("r-held")
        return found.status if found is not None else None

    wait_until(lambda: server.call(status) is RecordStatus.RELEASED)
    page.reload()
    expect(page.locator("#row-r-held")).to_have_count(0)


def test_start_and_download_an_export(page: Page, server: LiveServer, shots: Path) -> None:
    sign_in(page, server, Role.OFFICER, "/ui/exports")
    page.get_by_label("Search query (empty: everything)").fill("guarantee")
    page.get_by_label("Format").select_option("csv")
    screenshot(page, shots, "exports", ["Exports", "Start an export"])
    page.get_by_role("button", name="Start export").click()
    expect(page.locator("#export-done")).to_contain_text("2 records exported")
    screenshot(page, shots, "export-job", ["Finished", "records.csv", "manifest.json"])
    with page.expect_download() as download_info:
        page.get_by_role("link", name="records.csv").click()
    download = download_info.value
    assert download.suggested_filename == "records.csv"
    text = Path(download.path()).read_text()
    assert text.startswith("record_id,occurred_at,")
    assert "r-alice-1" in text and "r-alice-2" in text


def test_policy_editor_shows_problems_at_their_line(
    page: Page, server: LiveServer, shots: Path
) -> None:
    sign_in(page, server, Role.ADMIN, "/ui/policy")
    editor = page.get_by_label("Policy document (TOML)")
    editor.fill('version = 1\nlocal_domains = ["corp.example"]\n[federation]\nmode = "sideways"\n')
    page.get_by_role("button", name="Validate").click()
    expect(page.locator("#policy-result")).to_contain_text("line 4")
    screenshot(page, shots, "policy", ["Policy", "Versions", "not valid"])


def test_audit_log_and_its_verification(page: Page, server: LiveServer, shots: Path) -> None:
    sign_in(page, server, Role.AUDITOR, "/ui/audit")
    expect(page.locator("#audit-table")).to_contain_text("login")
    screenshot(page, shots, "audit", ["Audit log", "Verify the whole log"])
    page.get_by_role("link", name="Verify the whole log").click()
    expect(page.locator("#verify-result")).to_contain_text("The audit log is whole")
    screenshot(page, shots, "audit-verify", ["The audit log is whole"])


def test_keyboard_only_search(page: Page, server: LiveServer) -> None:
    sign_in(page, server, Role.OFFICER, "/ui/search")
    # the query box has focus on arrival; type and submit without a mouse
    # autofocus is applied after load: wait for it (Playwright retries the assertion)
    expect(page.locator("#q")).to_be_focused()
    page.keyboard.type("guarantee")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="2 records match")).to_be_visible()

    # the skip link comes first and moves focus to the main content
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to main content"
    page.keyboard.press("Enter")
    expect(page.locator("#main")).to_be_focused()

    # tab on to the first result, with a visible focus ring, and open it with Enter
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('open-message')"):
            break
    else:
        pytest.fail("no result link reached with Tab")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none")
    page.keyboard.press("Enter")
    expect(page).to_have_url(server.base_url + "/ui/messages/r-alice-2")


def test_conversation_shows_a_call_and_a_file_offer_inline(
    page: Page, server: LiveServer, shots: Path
) -> None:
    """Calls and transfers (docs/calls-and-files.md): steps folded into one line each."""
    carol, dave = "carol@corp.example", "dave@partner.example"

    def step(rid: str, minutes: int, kind: RecordKind, action: str, **kw: Any) -> ArchiveRecord:
        details = ExchangeDetails(protocol="jingle", action=action, sid=rid[:-2], **kw)
        base = record(
            rid,
            at=T0 + timedelta(minutes=minutes),
            sender=carol if action != "session-accept" else dave,
            recipient=dave if action != "session-accept" else carol,
            direction=Direction.FROM_CLIENT if action != "session-accept" else Direction.TO_CLIENT,
            kind=kind,
            stanza_type=action,
            body=f"{kind.value} {action}",
        )
        return replace(base, exchange=details)

    pdf = Attachment("", "jingle", "application/pdf", "deal-terms.pdf", 48213, "ab" * 32)
    records = [
        step("call-a-1", 1, RecordKind.CALL, "session-initiate", media=("audio", "video")),
        step("call-a-2", 2, RecordKind.CALL, "session-accept", media=("audio", "video")),
        step(
            "call-a-3",
            9,
            RecordKind.CALL,
            "session-terminate",
            reason="success",
            duration_seconds=425.0,
        ),
        replace(
            step("file-b-1", 10, RecordKind.FILE, "session-initiate", media=("file",)),
            attachments=(pdf,),
        ),
    ]

    async def add(env: WebEnv) -> None:
        await env.add_records(*records)

    server.call(add)
    sign_in(page, server, Role.OFFICER, "/ui/conversations")
    page.get_by_label("Participant", exact=True).fill(carol)
    page.get_by_label("Other participant").fill(dave)
    page.get_by_role("button", name="Show").click()
    transcript = page.locator("#transcript")
    expect(transcript.locator(".exchange")).to_have_count(2)  # three call steps, one line
    call = transcript.locator(".exchange[data-kind=call]")
    expect(call).to_contain_text("Call (audio, video)")
    expect(call.locator(".outcome")).to_have_text("success")
    expect(call.locator(".duration")).to_have_text("lasted 7 min 5 s")
    expect(transcript.locator(".file")).to_contain_text("deal-terms.pdf · 48213 bytes")
    expect(transcript.locator(".file")).to_contain_text("ab" * 32)
    screenshot(page, shots, "conversation-calls", ["Call", "deal-terms.pdf"])


def test_every_request_stays_on_this_origin(page: Page, server: LiveServer, watch: Watch) -> None:
    """The guard itself works: a request elsewhere is caught (and the check would fail)."""
    sign_in(page, server, Role.OFFICER)
    with pytest.raises(PlaywrightError):
        page.goto("http://192.0.2.1:9/")
    assert watch.foreign == ["http://192.0.2.1:9/"]
    watch.foreign.clear()  # expected here; any other stray request still fails the test
