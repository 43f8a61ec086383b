"""What the proxy fixtures need to know about the XMPP server behind the proxy.

Both :class:`tests.support.prosody.ProsodyServer` and
:class:`tests.support.ejabberd.EjabberdServer` have this shape, so the proxy and archiving
fixtures (``start_proxy``, ``RunningProxy``) work in front of either. :class:`ServerUnderTest`
is the wider surface of the scenarios that run against each of them (the ``upstream`` fixture).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from tests.support.certs import TlsPair


class XmppUpstream(Protocol):
    """A running test XMPP server: where its plain c2s port is, its names, its accounts."""

    @property
    def host(self) -> str: ...

    @property
    def domain(self) -> str: ...

    @property
    def muc_domain(self) -> str: ...

    @property
    def c2s_port(self) -> int: ...

    @property
    def tls(self) -> TlsPair: ...

    @property
    def users(self) -> dict[str, str]:
        """Registered local part -> password."""
        ...

    def jid(self, user: str, resource: str | None = None) -> str: ...

    def log_text(self) -> str: ...

    def diagnostics(self, max_chars: int = 4000) -> str: ...


class ServerUnderTest(XmppUpstream, Protocol):
    """A test XMPP server a shared scenario runs against: Prosody or ejabberd.

    A scenario makes its own accounts (``register_fresh``), so it runs the same on a server of
    its own (Prosody, one per test) and on one shared by the whole run (ejabberd).
    """

    @property
    def c2s_direct_tls_port(self) -> int | None: ...

    def register_fresh(self, *roles: str) -> dict[str, str]:
        """One new account per role; role -> local part (its password is in ``users``)."""
        ...

    def offline_count(self, user: str) -> int:
        """How many messages the server holds for ``user`` until a resource comes online."""
        ...

    def ack_complaints(self, users: Iterable[str]) -> list[str]:
        """Log lines where the server said a client's ``<a h/>`` did not match what it sent."""
        ...
