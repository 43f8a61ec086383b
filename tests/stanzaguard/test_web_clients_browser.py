"""Web clients end to end: strophe.js in Debian's Chromium, through the WebSocket and BOSH
front ends of the whole archiving service, chatting with a slixmpp TCP client.

strophe.js comes from the npm registry (scripts/get-strophe.sh: pinned version and integrity,
cached outside the work tree). The test serves a page on loopback that loads it; Playwright
drives the page. Each message must reach the other side, be archived exactly once, and a
message to a denied domain must come back to the browser as a policy-violation bounce.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import Browser, Page, async_playwright

from archive_api.store.records import ArchiveRecord, RecordStatus
from tests.stanzaguard.conftest import ArchivingProxy, start_archiving_service
from tests.support.prosody import LOOPBACK, ProsodyServer
from tests.support.services import service_unavailable

pytestmark = [pytest.mark.integration, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # This test only: the front ends use the test's throwaway self-signed certificate.
    "--ignore-certificate-errors",
]
TIMEOUT_MS = 15_000

DENY_EVIL = """
version = 1
local_domains = ["localhost", "conference.localhost"]

[federation]
mode = "deny"
domains = ["evil.example"]
"""

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>web client</title>
<script src="/strophe.js"></script></head>
<body><script>
window.chat = {
  received: [],
  statuses: [],
  connect(service, jid, password) {
    return new Promise((resolve, reject) => {
      const conn = new Strophe.Connection(service);
      this.conn = conn;
      conn.connect(jid, password, (status, condition) => {
        this.statuses.push([status, condition || null]);
        if (status === Strophe.Status.CONNECTED) {
          conn.addHandler((msg) => {
            const body = msg.getElementsByTagName("body")[0];
            const error = msg.getElementsByTagName("error")[0];
            this.received.push({
              from: msg.getAttribute("from"),
              id: msg.getAttribute("id"),
              type: msg.getAttribute("type"),
              body: body ? body.textContent : null,
              error: error ? Array.from(error.children).map((c) => c.localName) : null,
            });
            return true;
          }, null, "message");
          conn.send($pres());
          resolve(conn.jid);
        } else if ([Strophe.Status.CONNFAIL, Strophe.Status.AUTHFAIL,
                    Strophe.Status.ERROR].includes(status)) {
          reject(new Error("strophe status " + status + " " + condition));
        }
      });
    });
  },
  send(to, body, id) {
    this.conn.send($msg({to: to, type: "chat", id: id}).c("body").t(body));
  },
};
</script></body></html>
"""


@pytest.fixture(scope="module")
def strophe_js() -> Path:
    if not CHROMIUM.exists():
        service_unavailable(f"{CHROMIUM} is missing: install chromium (scripts/install-deps.sh)")
    fetched = subprocess.run(
        [str(ROOT / "scripts" / "get-strophe.sh")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if fetched.returncode != 0:
        service_unavailable(f"strophe.js could not be fetched: {fetched.stderr.strip()}")
    return Path(fetched.stdout.strip())


@pytest.fixture
async def page_url(strophe_js: Path) -> AsyncIterator[str]:
    """The test page and strophe.js, served over plain HTTP on loopback."""

    async def index(_request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def library(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(strophe_js, headers={"Content-Type": "text/javascript"})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/strophe.js", library)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://{LOOPBACK}:{port}/"
    await runner.cleanup()


@pytest.fixture
async def browser(strophe_js: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def web_archiving(prosody: ProsodyServer, tmp_path: Path) -> AsyncIterator[ArchivingProxy]:
    policy = tmp_path / "policy.toml"
    policy.write_text(DENY_EVIL)
    service = await start_archiving_service(
        prosody,
        data_dir=tmp_path / "data",
        policy_path=policy,
        listen_websocket=f"{LOOPBACK}:0",
        listen_bosh=f"{LOOPBACK}:0",
    )
    (host, port), (_, tls_port) = service.bound
    running = ArchivingProxy(service, prosody, tmp_path / "data", policy, host, port, tls_port)
    try:
        yield running
    finally:
        await running.stop()


async def received(page: Page, predicate: str) -> dict[str, Any]:
    """The first message the page received matching the JavaScript `predicate` (on `m`)."""
    handle = await page.wait_for_function(
        f"window.chat.received.find((m) => {predicate}) || null", timeout=TIMEOUT_MS
    )
    value = await handle.json_value()
    assert isinstance(value, dict)
    return value


async def records_with_id(running: ArchivingProxy, message_id: str) -> list[ArchiveRecord]:
    await running.drain()
    page = await running.store.search("type:chat", limit=1000)
    return [hit.record for hit in page.hits if hit.record.message_id == message_id]


@pytest.mark.parametrize("front_end", ["websocket", "bosh"])
async def test_browser_client_chats_is_archived_once_and_bounced(
    web_archiving: ArchivingProxy, browser: Browser, page_url: str, front_end: str
) -> None:
    running = web_archiving
    host, port = running.service.web_bound[front_end]
    service = (
        f"wss://{host}:{port}/xmpp-websocket"
        if front_end == "websocket"
        else f"https://{host}:{port}/http-bind"
    )
    bob = running.client("bob", resource="tcp")
    await bob.connect()
    context = await browser.new_context(ignore_https_errors=True)
    page = await context.new_page()
    try:
        await page.goto(page_url)
        jid = await page.evaluate(
            "([service, jid, password]) => window.chat.connect(service, jid, password)",
            [service, "alice@localhost/browser", running.prosody.users["alice"]],
        )
        assert jid == "alice@localhost/browser"

        # browser → TCP client
        out_id = f"{front_end}-out"
        await page.evaluate(
            "([to, body, id]) => window.chat.send(to, body, id)",
            [bob.jid, f"hello from the browser over {front_end}", out_id],
        )
        got = await bob.next_message(where=lambda m: m.id == out_id)
        assert got.body == f"hello from the browser over {front_end}"
        assert got.from_ == "alice@localhost/browser"

        # TCP client → browser
        in_id = bob.send_chat("alice@localhost/browser", f"hello browser ({front_end})")
        message = await received(page, f"m.id === {in_id!r}")
        assert message["body"] == f"hello browser ({front_end})"
        assert message["from"] == bob.jid

        # A denied domain is bounced to the web client, as to a TCP client.
        denied_id = f"{front_end}-denied"
        await page.evaluate(
            "([to, body, id]) => window.chat.send(to, body, id)",
            ["mallory@evil.example", "buy now", denied_id],
        )
        bounce = await received(page, f"m.id === {denied_id!r} && m.type === 'error'")
        assert "policy-violation" in bounce["error"]
        assert bounce["from"] == "mallory@evil.example"

        # Each message is one record, seen on both sides of the proxy.
        for message_id in (out_id, in_id):
            records = await records_with_id(running, message_id)
            assert len(records) == 1, records
            assert records[0].status is RecordStatus.DELIVERED
        denied = await records_with_id(running, denied_id)
        assert len(denied) == 1 and denied[0].status is RecordStatus.REJECTED
    finally:
        await context.close()
