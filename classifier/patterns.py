"""Domain and member patterns, validated once and matched in O(labels) per lookup.

Domain patterns have exactly three forms, chosen so that a list cannot match by accident:

- ``example.com``: that domain only;
- ``*.example.com``: every subdomain of ``example.com`` at any depth (``a.example.com``,
  ``a.b.example.com``) but **not** ``example.com`` itself; list both to cover both. This keeps
  the meaning of ``*.`` the same as in DNS wildcards and certificates, and lets a policy allow a
  partner's chat host while denying its other subdomains;
- ``*``: every domain.

General shell globs (``evil*.com``, ``?``, ``[...]``) are refused: ``*example.com`` would also
match ``notexample.com``, which is the kind of surprise a federation list must not have.

Member patterns name local users: ``alice@corp.example`` (one user) or ``*@corp.example``
(every user of that domain).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from classifier.errors import RuleError
from classifier.jid import normalise_bare, normalise_domain, normalise_localpart, split_jid

ANY_DOMAIN = "*"

_MAX_DOMAIN = 253
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_BAD_LOCAL_CHARS = frozenset("\"&'/:<>@")
_MAX_LOCAL_BYTES = 1023


def _q(text: str) -> str:
    """Quote user text for an error message, cut short: hostile input can be megabytes."""
    return repr(text) if len(text) <= 80 else repr(text[:77]) + "..."


def _validate_domain(domain: str, original: str) -> None:
    if not domain:
        raise RuleError(f"{_q(original)} is empty")
    if "@" in domain or "/" in domain:
        raise RuleError(f"{_q(original)} looks like a JID; give only the domain")
    if len(domain) > _MAX_DOMAIN:
        raise RuleError(f"{_q(original)} is longer than {_MAX_DOMAIN} characters")
    for label in domain.split("."):
        if not _LABEL.fullmatch(label):
            raise RuleError(
                f"{_q(original)} is not a valid domain (bad label {_q(label)}; labels are 1-63 "
                "letters, digits, '-' or '_')"
            )


def parse_domain_pattern(pattern: str) -> str:
    """Validate a domain pattern and return its normalised form.

    Raises:
        RuleError: with a message that names the pattern and says what is wrong.
    """
    text = pattern.strip()
    if text == ANY_DOMAIN:
        return ANY_DOMAIN
    wildcard = text.startswith("*.")
    core = text[2:] if wildcard else text
    if any(c in core for c in "*?[]"):
        raise RuleError(
            f"{_q(pattern)}: only 'domain', '*.domain' (subdomains) or '*' (all) are supported"
        )
    domain = normalise_domain(core)
    _validate_domain(domain, pattern)
    return f"*.{domain}" if wildcard else domain


class DomainMatcher:
    """A set of domain patterns; `match` says which pattern (if any) covers a domain."""

    __slots__ = ("_any", "_exact", "_suffixes")

    def __init__(self, patterns: Iterable[str]) -> None:
        """Build from raw patterns; each is validated with `parse_domain_pattern`."""
        exact: set[str] = set()
        suffixes: set[str] = set()
        any_domain = False
        for raw in patterns:
            parsed = parse_domain_pattern(raw)
            if parsed == ANY_DOMAIN:
                any_domain = True
            elif parsed.startswith("*."):
                suffixes.add(parsed[2:])
            else:
                exact.add(parsed)
        self._exact = frozenset(exact)
        self._suffixes = frozenset(suffixes)
        self._any = any_domain

    @property
    def patterns(self) -> tuple[str, ...]:
        """The normalised patterns, sorted (a canonical form)."""
        items = [*self._exact, *(f"*.{s}" for s in self._suffixes)]
        if self._any:
            items.append(ANY_DOMAIN)
        return tuple(sorted(items))

    def __len__(self) -> int:
        return len(self._exact) + len(self._suffixes) + int(self._any)

    def match(self, domain: str) -> str | None:
        """Return the pattern that covers ``domain`` (normalised here), or ``None``.

        An exact entry is preferred over a wildcard one so the reported pattern is the most
        specific.
        """
        name = normalise_domain(domain)
        if name in self._exact:
            return name
        if self._suffixes:
            start = name.find(".")
            while start != -1:
                suffix = name[start + 1 :]
                if suffix in self._suffixes:
                    return f"*.{suffix}"
                start = name.find(".", start + 1)
        if self._any:
            return ANY_DOMAIN
        return None


def parse_member_pattern(pattern: str) -> str:
    """Validate a member pattern (``user@domain`` or ``*@domain``); return its normal form.

    Raises:
        RuleError: if the pattern is not of either form.
    """
    text = pattern.strip()
    local, domain, resource = split_jid(text)
    if resource is not None:
        raise RuleError(f"{_q(pattern)}: give a bare JID, without a '/resource'")
    if local is None:
        raise RuleError(f"{_q(pattern)}: must be 'user@domain' or '*@domain'")
    if local != "*":
        if "*" in local:
            # A literal '*' is legal in a localpart, but 'a*@x' almost surely means a prefix
            # wildcard, which is not supported; refusing it beats silently matching nobody.
            raise RuleError(f"{_q(pattern)}: wildcards are only supported for the whole localpart")
        if not local or any(c in _BAD_LOCAL_CHARS or c.isspace() for c in local):
            raise RuleError(f"{_q(pattern)}: {_q(local)} is not a valid localpart")
        if len(local.encode("utf-8", "surrogatepass")) > _MAX_LOCAL_BYTES:
            raise RuleError(f"{_q(pattern)}: localpart is longer than {_MAX_LOCAL_BYTES} bytes")
        local = normalise_localpart(local)
    normal_domain = normalise_domain(domain)
    if "*" in normal_domain:
        raise RuleError(f"{_q(pattern)}: wildcards are only supported for the whole localpart")
    _validate_domain(normal_domain, pattern)
    return f"{local}@{normal_domain}"


@dataclass(frozen=True, slots=True)
class UserGroup:
    """A named set of local users, matched by bare JID.

    Build with `UserGroup.of`; ``members`` holds normalised patterns, sorted.
    """

    name: str
    members: tuple[str, ...]
    _users: frozenset[str]
    _domains: frozenset[str]

    @classmethod
    def of(cls, name: str, members: Iterable[str]) -> UserGroup:
        """Build a group from raw member patterns.

        Raises:
            RuleError: if a member pattern is invalid.
        """
        parsed = sorted({parse_member_pattern(m) for m in members})
        users = frozenset(p for p in parsed if not p.startswith("*@"))
        domains = frozenset(p[2:] for p in parsed if p.startswith("*@"))
        return cls(name, tuple(parsed), users, domains)

    def contains(self, jid: str) -> bool:
        """Whether the user ``jid`` (bare or full; normalised here) is a member."""
        bare = normalise_bare(jid)
        if bare.localpart is None:
            return False
        return bare.domain in self._domains or str(bare) in self._users
