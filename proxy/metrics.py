"""Prometheus counters of the proxy's transport. Never labelled by user or content."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SESSIONS = Counter("stanzaguard_sessions", "Client connections accepted")
ACTIVE = Gauge("stanzaguard_sessions_active", "Client connections open now")
AUTHENTICATED = Counter("stanzaguard_sessions_authenticated", "Sessions that authenticated")
STANZAS = Counter("stanzaguard_stanzas", "Stanzas forwarded", ["direction"])
DROPPED = Counter("stanzaguard_stanzas_dropped", "Stanzas not forwarded", ["direction"])
INJECTED = Counter("stanzaguard_stanzas_injected", "Stanzas the proxy sent itself", ["direction"])
BYTES = Counter("stanzaguard_bytes", "Bytes relayed", ["direction"])
CLOSED = Counter("stanzaguard_streams_closed", "Streams ended, by reason", ["reason"])
