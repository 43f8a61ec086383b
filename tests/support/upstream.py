"""What the proxy fixtures need to know about the XMPP server behind the proxy.

Both :class:`tests.support.prosody.ProsodyServer` and
:class:`tests.support.ejabberd.EjabberdServer` have this shape, so the proxy and archiving
fixtures (``start_proxy``, ``RunningProxy``) work in front of either.
"""

from __future__ import annotations

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
