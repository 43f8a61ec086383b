"""How records, hits and facets look in the JSON API (the web UI may reuse these).

Text is returned as text; matches in snippets are parts flagged `match`, never markup, so
no message content can inject HTML into a page that renders them with escaping.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from archive_api.store.base import Facets, Hit, SnippetPart
from archive_api.store.records import ArchiveRecord, RecordKind


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def record_type(record: ArchiveRecord) -> str:
    """What the search language's `type:` calls it: chat, groupchat, ..., subscription."""
    if record.kind is RecordKind.MESSAGE:
        return record.stanza_type or "normal"
    return record.kind.value


def record_summary(record: ArchiveRecord) -> dict[str, Any]:
    """The fields a list shows (no raw XML, no observations)."""
    return {
        "record_id": record.record_id,
        "occurred_at": record.occurred_at.isoformat(),
        "kind": record.kind.value,
        "type": record_type(record),
        "direction": record.direction.value,
        "sender": record.sender,
        "sender_full": record.sender_full,
        "recipient": record.recipient,
        "room": record.room,
        "remote_domain": record.remote_domain,
        "subject": record.subject,
        "body": record.body,
        "encryption": record.encryption,
        "attachments": len(record.attachments),
        "replaces_id": record.replaces_id,
        "retracts_id": record.retracts_id,
        "verdict": {"action": record.verdict.action.value, "score": record.verdict.score},
        "status": record.status.value,
    }


def record_detail(record: ArchiveRecord) -> dict[str, Any]:
    """Every field of the record, the raw stanza as text (and exact bytes in base64), the
    verdict with its reasons and every observation."""
    data = record.to_json()
    data.pop("raw", None)
    data["type"] = record_type(record)
    data["remote_domain"] = record.remote_domain
    data["raw_xml"] = record.raw.decode("utf-8", "replace")
    data["raw_base64"] = base64.b64encode(record.raw).decode("ascii")
    return data


def snippet_json(parts: Sequence[SnippetPart]) -> list[dict[str, Any]]:
    return [{"text": part.text, "match": part.match} for part in parts]


def hit_json(hit: Hit) -> dict[str, Any]:
    data = record_summary(hit.record)
    data["snippet"] = snippet_json(hit.snippet)
    data["score"] = hit.score
    return data


def facets_json(facets: Facets) -> dict[str, Any]:
    return {
        "verdict": [{"value": action.value, "count": n} for action, n in facets.by_action],
        "remote_domain": [{"value": domain, "count": n} for domain, n in facets.by_remote_domain],
        "day": [{"value": day.isoformat(), "count": n} for day, n in facets.by_day],
    }


def history_entry(record: ArchiveRecord) -> dict[str, Any]:
    """One step of an edit history: the original, a correction or a retraction."""
    if record.retracts_id:
        role = "retraction"
    elif record.replaces_id:
        role = "correction"
    else:
        role = "original"
    return {
        "record_id": record.record_id,
        "role": role,
        "occurred_at": record.occurred_at.isoformat(),
        "sender_full": record.sender_full,
        "body": record.body,
        "replaces_id": record.replaces_id,
        "retracts_id": record.retracts_id,
    }
