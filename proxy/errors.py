"""The proxy package's exception tree."""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error raised by the proxy package."""


class StreamClosed(ProxyError):
    """A stream must end; carries the RFC 6120 stream error condition to send first."""

    def __init__(self, condition: str, detail: str = "") -> None:
        super().__init__(f"{condition}: {detail}" if detail else condition)
        self.condition = condition
        self.detail = detail


class FramingError(StreamClosed):
    """The peer sent bytes that break the stream's XML or its limits."""


class UpstreamError(ProxyError):
    """The upstream XMPP server could not be reached or broke the stream."""


class SpoolUnavailable(ProxyError):
    """The spool cannot durably take entries right now; the caller must fail closed.

    Nothing of the append that raised this was written. A later append retries by itself.
    """


class SpoolCorrupt(ProxyError):
    """The spool's files fail verification (a bad frame, a broken chain or a missing segment)."""


class StanzaError(ProxyError):
    """A normalised event was used for something it cannot be (e.g. archiving an `Ignored`)."""
