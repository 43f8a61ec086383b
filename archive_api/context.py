"""Everything the API's routes need, in one typed object the composition root builds.

`create_app(ctx)` (archive_api/app.py) keeps the `ApiContext` on `app.state.ctx`; a route
(or the web UI's router) reaches it through `request.app.state.ctx` or the `get_context`
dependency. Nothing here opens a file or a connection: the root (`stanzaguard/api_wiring.py`)
builds the parts and hands them over, and tests build them around a real SQLite store.

Two duties belong to the process that runs the proxy, not to this package, so they are
Protocols the root implements:

- `ReviewActions`: release, confirm-spam, not-spam and label a quarantined or flagged record
  (the root uses the quarantine service of a proxy in the same process, or the review
  mailbox in DATA/review when the API runs on its own);
- `PolicyStore`: the policy document, its validation, its versioned history and writing a
  new version that running proxies pick up without a restart.

Both take the actor as the audit log names them (`Identity.subject`): auditing is the
route's job, not theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from archive_api.audit import AuditLog
from archive_api.auth import Authenticator, TokenService
from archive_api.errors import ArchiveApiError
from archive_api.export_jobs import ExportJobs
from archive_api.holds import HoldService
from archive_api.retention import RetentionPolicy
from archive_api.store.base import ArchiveStore
from classifier.clock import Clock

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
"""Most records one API page returns (the store allows more; the API keeps responses small)."""


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The API's own settings, taken from the service settings by the composition root.

    `export_dir` holds one directory per export job (files and manifest). `secure_cookies`
    is False only for plain-http development set-ups (the cookie is then not `Secure`).
    """

    export_dir: Path
    development: bool = False
    secure_cookies: bool = True
    session_max_age: timedelta = timedelta(hours=8)
    dashboard_days: int = 30  # default window of /dashboard
    max_dashboard_days: int = 366
    max_export_jobs_running: int = 2  # exports run in the background, this many at once
    title: str = "StanzaGuard"


# --- review actions ---------------------------------------------------------------------------


class ReviewLabel(StrEnum):
    SPAM = "spam"
    HAM = "ham"


@dataclass(frozen=True, slots=True)
class ReviewOutcome:
    """What a review action did.

    `ok` False means refused (unknown record, not quarantined, already decided the other
    way) and `detail` says why; `queued` means the running proxy has not applied it yet (the
    API runs in another process and the request waits in the review mailbox). `status` is
    the record's status afterwards, when known.
    """

    ok: bool
    detail: str
    record_id: str
    status: str | None = None
    queued: bool = False
    delivered_to: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "detail": self.detail,
            "record_id": self.record_id,
            "status": self.status,
            "queued": self.queued,
            "delivered_to": list(self.delivered_to),
        }


class ReviewUnavailable(ArchiveApiError):
    """A review action cannot be carried out now (the spool or the mailbox is unavailable)
    (HTTP 503); nothing was changed."""


class ReviewActions(Protocol):
    """Officer decisions on quarantined and flagged records; each feeds the classifier's
    learning. `actor` is the audit name of who decides (``token:desk-officer-1``)."""

    async def release(self, record_id: str, actor: str) -> ReviewOutcome:
        """Release a held (quarantined) message: delivered now or at the recipient's login."""
        ...

    async def confirm_spam(self, record_id: str, actor: str) -> ReviewOutcome:
        """A held message is spam (never delivered); a flagged one is labelled spam."""
        ...

    async def not_spam(self, record_id: str, actor: str) -> ReviewOutcome:
        """A held message is released as ham; a flagged one is labelled ham."""
        ...

    async def label(self, record_id: str, label: ReviewLabel, actor: str) -> ReviewOutcome:
        """Label any archived message spam or ham (a training example)."""
        ...


# --- policy ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """One reason a policy document is refused, located as well as can be.

    `key` is the dotted path of the offending key (``federation.mode``) when the document
    is TOML but not a valid policy; `line` and `column` (1-based) point into the text.
    """

    message: str
    line: int | None = None
    column: int | None = None
    key: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"message": self.message, "line": self.line, "column": self.column, "key": self.key}


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    """One version in the policy's history (1, 2, 3, ...)."""

    version: int
    sha256: str  # of the document's UTF-8 bytes
    created_at: datetime
    actor: str
    size: int
    comment: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sha256": self.sha256,
            "created_at": self.created_at.isoformat(),
            "actor": self.actor,
            "size": self.size,
            "comment": self.comment,
        }


@dataclass(frozen=True, slots=True)
class PolicyDocument:
    """The policy in force: its text and which version of the history it is.

    `version` is None when the file was changed outside the API (or no version was ever
    written through it); `path` is where the file lives, for the admin's orientation.
    """

    text: str
    sha256: str
    version: int | None
    path: str | None = None
    editable: bool = True  # False when no policy file is configured

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "sha256": self.sha256,
            "version": self.version,
            "path": self.path,
            "editable": self.editable,
        }


class PolicyInvalid(ArchiveApiError, ValueError):
    """A candidate policy was refused; `problems` says where (HTTP 422)."""

    def __init__(self, problems: tuple[PolicyProblem, ...]) -> None:
        first = problems[0].message if problems else "the policy is not valid"
        super().__init__(first)
        self.problems = problems


class PolicyConflict(ArchiveApiError):
    """The policy changed since the version the writer started from, or cannot be written
    here (no policy file configured) (HTTP 409)."""


class PolicyStore(Protocol):
    """The policy document the proxies enforce, with a versioned history of every change."""

    async def current(self) -> PolicyDocument: ...

    async def validate(self, text: str) -> tuple[PolicyProblem, ...]:
        """Every problem found (empty: the text is a valid policy). Never raises for bad text."""
        ...

    async def write(
        self, text: str, *, actor: str, base_version: int | None = None, comment: str | None = None
    ) -> PolicyVersion:
        """Validate, keep as the next version, and put it in force (atomically).

        Raises PolicyInvalid with the problems, PolicyConflict when `base_version` is given
        and is not the current version (someone else changed it meanwhile) or when the
        policy cannot be written.
        """
        ...

    async def versions(self) -> tuple[PolicyVersion, ...]:
        """The history, oldest first."""
        ...

    async def version_text(self, version: int) -> str:
        """The text of one version; NotFound (archive_api.store.errors) when there is none."""
        ...


# --- the context ----------------------------------------------------------------------------


@dataclass(slots=True)
class ApiContext:
    """The parts every route uses. Built once by the composition root; tests build their own.

    `export_jobs` is filled in by `create_app` when the root leaves it None (it needs only
    the parts above it). `metrics` is the Prometheus registry `/metrics` serves; each app
    gets its own unless the root passes one (the default registry, to include the proxy's
    own metrics when both run in one process).
    """

    config: ApiConfig
    store: ArchiveStore
    audit: AuditLog
    authenticator: Authenticator
    tokens: TokenService
    clock: Clock
    holds: HoldService
    review: ReviewActions
    policy: PolicyStore
    retention: RetentionPolicy | None = None
    metrics: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )
    export_jobs: ExportJobs | None = None  # made by create_app when None
