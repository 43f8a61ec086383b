"""API tokens as stores keep them: a name, a role, and the SHA-256 of the secret, never the secret.

Roles are kept as text here (the store does not know what they allow; `archive_api.auth`
does). Names are unique for the life of the store, revoked tokens included, so a name in the
audit log always means one token. A token is found by the hash of the secret a client
presents; tokens carry at least 256 bits of randomness, so a plain (unsalted, fast) hash is
enough: there is nothing to brute-force.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from archive_api.store.errors import InvalidRequest

TOKEN_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
"""1 to 64 characters: letters, digits and `. _ @ -`, starting with a letter or digit."""
SECRET_HASH_BYTES: Final = 32
MAX_ROLE_CHARS: Final = 64


def check_token_name(name: object) -> str:
    """The name, or InvalidRequest saying what a name may be."""
    if not isinstance(name, str) or TOKEN_NAME_PATTERN.fullmatch(name) is None:
        shown = name[:40] if isinstance(name, str) else type(name).__name__
        raise InvalidRequest(
            f"invalid token name {shown!r}: 1 to 64 letters, digits or . _ @ -, "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class StoredToken:
    """One API token's stored record. `secret_hash` is SHA-256 of the secret's UTF-8 bytes."""

    name: str
    role: str
    secret_hash: bytes
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def check(self) -> None:
        """InvalidRequest naming the first field a store must not accept."""
        check_token_name(self.name)
        if (
            not isinstance(self.role, str)
            or not self.role
            or len(self.role) > MAX_ROLE_CHARS
            or not self.role.isprintable()
        ):
            raise InvalidRequest("token role must be 1 to 64 printable characters")
        if not isinstance(self.secret_hash, bytes) or len(self.secret_hash) != SECRET_HASH_BYTES:
            raise InvalidRequest("token secret_hash must be 32 bytes (SHA-256)")
        for what, at in (
            ("created_at", self.created_at),
            ("expires_at", self.expires_at),
            ("revoked_at", self.revoked_at),
        ):
            if at is None and what != "created_at":
                continue
            if not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None:
                raise InvalidRequest(f"token {what} must be a timezone-aware datetime")
