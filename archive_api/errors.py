"""The exception tree of the service layer (`archive_api`, above the store).

Callers catch `ArchiveApiError` for anything this layer raises on purpose; the store's own
errors (`archive_api.store.errors.StoreError`) pass through unchanged, so a route can map
both trees to HTTP statuses. Add a subclass here rather than raising a bare exception.
"""

from __future__ import annotations


class ArchiveApiError(Exception):
    """Base class of every error the service layer raises deliberately."""


class NotPermitted(ArchiveApiError):
    """The actor's role does not allow this action (for example releasing a legal hold)."""


class InvalidInput(ArchiveApiError, ValueError):
    """A caller passed something this layer cannot act on; the message says what and why."""


class HoldError(ArchiveApiError):
    """A legal-hold operation could not be done."""


class UnknownHold(HoldError, LookupError):
    """No legal hold has the given id."""

    def __init__(self, hold_id: str) -> None:
        super().__init__(f"no legal hold with id {hold_id[:80]!r}")
        self.hold_id = hold_id


class HoldAlreadyReleased(HoldError):
    """The hold was released before; a release is final."""


class RetentionPolicyError(ArchiveApiError, ValueError):
    """A retention policy document is not valid.

    `key` is the dotted path of the offending key (``"retention.classes.broker"``), or None
    when the problem is the whole document.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ExportError(ArchiveApiError):
    """An export could not be written (target not empty, no font for PDF, disk error, ...)."""


# -- access and audit (archive_api/auth.py, archive_api/audit.py) --------------------------------


class AuthenticationFailed(ArchiveApiError):
    """No valid credential: missing, malformed, unknown, revoked or expired (HTTP 401).

    `reason` is a short machine-readable word (see `archive_api.auth.FailureReason`);
    `token_name` names the token when the credential was a real but unusable one (revoked,
    expired), so the failure can be audited against it. The message never contains a secret.
    """

    def __init__(self, reason: str, message: str, *, token_name: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.token_name = token_name


class PermissionDenied(NotPermitted):
    """An authenticated identity lacks the permission a route declares (HTTP 403)."""

    def __init__(self, subject: str, role: str, permission: str) -> None:
        super().__init__(f"{subject} (role {role}) may not {permission}")
        self.subject = subject
        self.role = role
        self.permission = permission


class AuthConfigError(ArchiveApiError):
    """Access control is misconfigured (a default or short session secret in production)."""


class AuditError(ArchiveApiError):
    """An audit event could not be recorded; the action it describes must not go ahead."""
