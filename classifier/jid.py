"""JID and domain normalisation used for matching (never for display or archiving).

Matching must not depend on how a peer spells a JID: domains are compared in lower-case ASCII
(IDNA A-label) form, localparts case-folded. The functions here never raise on hostile input;
anything they cannot make sense of is compared as lower-case text, which can only fail to match.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache

# Full stops that IDNA treats as label separators besides U+002E.
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})

# Inputs longer than this are not cached: a legal JID part is at most 1023 bytes (3071 for a
# whole JID), and caching hostile megabyte strings would turn the cache into a memory sink.
_CACHE_LIMIT = 3071


@dataclass(frozen=True, slots=True)
class BareJid:
    """A normalised bare JID: ``localpart`` is ``None`` for a domain (server or service) JID."""

    localpart: str | None
    domain: str

    def __str__(self) -> str:
        return self.domain if self.localpart is None else f"{self.localpart}@{self.domain}"


def split_jid(jid: str) -> tuple[str | None, str, str | None]:
    """Split ``local@domain/resource`` into its three parts, without normalising.

    The resource starts at the first ``/`` and may itself contain ``@`` and ``/``; a localpart
    cannot contain ``@``, so the domain is what follows the first ``@`` before the resource.
    """
    head, slash, resource = jid.partition("/")
    local, at, domain = head.partition("@")
    if not at:
        return None, head, resource if slash else None
    return local, domain, resource if slash else None


def normalise_domain(domain: str) -> str:
    """Return the comparison form of a domain: NFC, lower case, A-labels, no trailing dot.

    Non-ASCII labels are punycode-encoded after lower-casing, without IDNA 2003's nameprep
    mapping, so ``faß.example`` and ``fass.example`` stay distinct (as in IDNA 2008).
    """
    if len(domain) > _CACHE_LIMIT:
        return _normalise_domain(domain)
    return _normalise_domain_cached(domain)


@lru_cache(maxsize=8192)
def _normalise_domain_cached(domain: str) -> str:
    return _normalise_domain(domain)


def _normalise_domain(domain: str) -> str:
    text = unicodedata.normalize("NFC", domain.strip()).translate(_DOTS).lower()
    if text.endswith(".") and text != ".":
        text = text[:-1]
    if text.isascii():
        return text
    labels = []
    for label in text.split("."):
        if label.isascii():
            labels.append(label)
            continue
        try:
            labels.append("xn--" + label.encode("punycode").decode("ascii"))
        except UnicodeError:
            # Lone surrogates and the like: keep the text; it will simply never match a
            # validated pattern, which are all ASCII.
            labels.append(label)
    return ".".join(labels)


def normalise_localpart(localpart: str) -> str:
    """Return the comparison form of a localpart: NFC and Unicode case folding (RFC 8265)."""
    return unicodedata.normalize("NFC", localpart).casefold()


def domain_of(jid: str) -> str:
    """The normalised domain of any JID (bare or full, with or without a localpart)."""
    if len(jid) > _CACHE_LIMIT:
        return normalise_domain(split_jid(jid)[1])
    return _domain_of_cached(jid)


@lru_cache(maxsize=8192)
def _domain_of_cached(jid: str) -> str:
    return normalise_domain(split_jid(jid)[1])


def normalise_bare(jid: str) -> BareJid:
    """The normalised bare JID of any JID; the resource is dropped."""
    if len(jid) > _CACHE_LIMIT:
        return _normalise_bare(jid)
    return _normalise_bare_cached(jid)


def _normalise_bare(jid: str) -> BareJid:
    local, domain, _ = split_jid(jid)
    return BareJid(
        None if local is None else normalise_localpart(local),
        normalise_domain(domain),
    )


# The same few thousand correspondents account for most traffic, so caching pays.
_normalise_bare_cached = lru_cache(maxsize=8192)(_normalise_bare)
