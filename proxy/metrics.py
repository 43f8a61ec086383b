"""Prometheus counters of the proxy's transport. Never labelled by user or content."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from archive_api.store.records import Direction

SESSIONS = Counter("stanzaguard_sessions", "Client connections accepted")
ACTIVE = Gauge("stanzaguard_sessions_active", "Client connections open now")
AUTHENTICATED = Counter("stanzaguard_sessions_authenticated", "Sessions that authenticated")
STANZAS = Counter("stanzaguard_stanzas", "Stanzas forwarded", ["direction"])
DROPPED = Counter("stanzaguard_stanzas_dropped", "Stanzas not forwarded", ["direction"])
INJECTED = Counter("stanzaguard_stanzas_injected", "Stanzas the proxy sent itself", ["direction"])
BYTES = Counter("stanzaguard_bytes", "Bytes relayed", ["direction"])
CLOSED = Counter("stanzaguard_streams_closed", "Streams ended, by reason", ["reason"])

# Label children bound once: `labels()` takes a lock and a dict look-up, too much per stanza.
STANZAS_BY = {d: STANZAS.labels(d.value) for d in Direction}
DROPPED_BY = {d: DROPPED.labels(d.value) for d in Direction}
INJECTED_BY = {d: INJECTED.labels(d.value) for d in Direction}
BYTES_BY = {d: BYTES.labels(d.value) for d in Direction}

SEEN_LEDGER = Counter(
    "stanzaguard_seen_ledger",
    "Look-ups and writes of the record ids shared by all proxies (seen_ledger=redis), by outcome",
    ["outcome"],
)

SHARED_REVIEW = Counter(
    "stanzaguard_shared_review",
    "Officers' review actions across replicas (review_queue=redis), by event: requests "
    "applied, refused as garbage or postponed, releases announced or left to retry, "
    "released copies delivered into this replica's sessions",
    ["event"],
)
