"""Component mode on store=elasticsearch: the admins' ad-hoc commands, audited in
Elasticsearch (osmem-server), in front of the real Prosody of the component tests."""

from __future__ import annotations

from archive_api.audit import AuditOutcome
from archive_api.store.elasticsearch import ElasticsearchStore
from tests.conftest import ClientFactory
from tests.stanzaguard import es_support, test_component_e2e
from tests.stanzaguard.conftest import receive
from tests.stanzaguard.es_support import EsLocation
from tests.stanzaguard.test_component_e2e import (
    POLICY,
    ComponentFactory,
    admin_events,
    run_command,
    wait_records,
)

# The fixtures this module uses (pytest finds them as module attributes).
osmem_server = es_support.osmem_server
es_client = es_support.es_client
es_location = es_support.es_location
prosody = test_component_e2e.prosody
component_factory = test_component_e2e.component_factory


async def test_admin_commands_are_audited_in_elasticsearch(
    es_location: EsLocation, component_factory: ComponentFactory, make_client: ClientFactory
) -> None:
    # es_location first: its indices are dropped only after the service has stopped.
    service = await component_factory(
        policy=POLICY,
        component_admins=["alice@localhost"],
        store="elasticsearch",
        es_url=[es_location.url],
        es_index_prefix=es_location.prefix,
        # The index worker process, as in production: the tests' `drain` beside a running
        # in-process indexer would race it for the same seq in Elasticsearch.
        index_worker=True,
    )
    assert isinstance(service.store, ElasticsearchStore)
    alice = make_client("alice", resource="laptop", plugins=["xep_0004", "xep_0050"])
    bob = make_client("bob", resource="desk", plugins=["xep_0004", "xep_0050"])
    await alice.connect()
    await bob.connect()
    bob.send_chat(alice.jid, "a message to look up on elasticsearch", id="es-1")
    await receive(alice, "a message to look up on elasticsearch")
    await wait_records(service, '"a message to look up on elasticsearch"', 1)

    answer = await run_command(alice, "recent-verdicts", "jid", "bob@localhost")
    assert answer["command"]["status"] == "completed"
    items = answer["command"]["form"]["items"]
    assert [(i["recipient"], i["action"]) for i in items] == [("alice@localhost", "allow")]
    answer = await run_command(alice, "deny-domain", "domain", "Junk.Example")
    assert answer["command"]["status"] == "completed"
    # Hostile input: refused with an error note, audited as invalid.
    answer = await run_command(alice, "recent-verdicts", "jid", 'bob@localhost" OR from:*')
    (note,) = answer["command"]["notes"]
    assert note[0] == "error", note

    events = await admin_events(service)
    by_command = {(e.params["command"], e.outcome) for e in events}
    assert ("recent-verdicts", AuditOutcome.OK.value) in by_command
    assert ("deny-domain", AuditOutcome.OK.value) in by_command
    assert ("recent-verdicts", AuditOutcome.INVALID.value) in by_command
    assert all(e.actor == "xmpp:alice@localhost" for e in events)
    assert (await service.store.verify_audit()).ok
    # Nothing of the audit log went into a SQLite file beside Elasticsearch.
    assert not (service.settings.data_dir / "archive.sqlite3").exists()
