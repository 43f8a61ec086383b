"""Attachments end to end: a real client shares an upload URL through the whole service.

Real Prosody, the `ArchivingService` in front of it with `upload_hosts` naming a loopback
HTTP server, a slixmpp client sending the URL as body and OOB (as Conversations does). The
message is delivered at once; the file lands content-addressed under the data directory and
its digest and size in the archived record. A link to a host not named is never requested.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from slixmpp.xmlstream import ET

from proxy.attachments import content_path
from tests.proxy.test_attachments import PDF, FileServer
from tests.stanzaguard.conftest import ArchivingFactory

TIMEOUT = 10.0


@pytest.fixture
def upload() -> Iterator[FileServer]:
    server = FileServer("127.0.0.1")
    server.files["/share/abc/report.pdf"] = (PDF, "application/pdf")
    yield server
    server.close()


@pytest.fixture
def elsewhere() -> Iterator[FileServer]:
    server = FileServer("127.0.0.2")
    yield server
    server.close()


def oob(url: str) -> ET.Element:
    element = ET.Element("{jabber:x:oob}x")
    ET.SubElement(element, "{jabber:x:oob}url").text = url
    return element


async def test_a_shared_file_is_archived_beside_the_message(
    archiving_factory: ArchivingFactory, upload: FileServer, elsewhere: FileServer
) -> None:
    running = await archiving_factory(
        environment="development",
        upload_hosts=f"127.0.0.1:{upload.port}",
        attachment_allow_http=True,
    )
    alice = running.client("alice")
    bob = running.client("bob")
    await alice.connect()
    await bob.connect()
    url = upload.url("/share/abc/report.pdf")
    link = elsewhere.url("/cat.gif")
    message_id = alice.send_chat("bob@localhost", url, payload=[oob(url), oob(link)])
    received = await bob.next_message(TIMEOUT, where=lambda m: m.id == message_id)
    assert received.body == url

    fetcher = running.service.attachments
    assert fetcher is not None
    await fetcher.wait_idle()
    await running.drain()
    (hit,) = (await running.store.search("has:attachment")).hits
    by_url = {a.url: a for a in hit.record.attachments}
    digest = hashlib.sha256(PDF).hexdigest()
    assert (by_url[url].sha256, by_url[url].size) == (digest, len(PDF))
    assert by_url[link].sha256 is None
    stored = content_path(running.data_dir / "attachments", digest)
    assert stored.read_bytes() == PDF
    assert upload.requests == ["/share/abc/report.pdf"]
    assert elsewhere.requests == []
    assert (await running.store.verify()).ok
    await running.stop()  # stops the fetcher before the spool closes
    assert fetcher.submit("x", hit.record.attachments[0]) is False
