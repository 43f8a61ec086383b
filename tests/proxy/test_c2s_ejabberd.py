"""The inline c2s proxy in front of Debian's ejabberd: what only ejabberd does.

The scenarios that hold on every server (chat, carbons, MUC, offline, go-sendxmpp, features,
channel binding, stream management with a dropped stanza, resumption after a TCP cut) run
against ejabberd as ``test_c2s.py::...[ejabberd]``. Here: the SASL mechanisms ejabberd offers
with plain password storage (Prosody's depend on how it stores them: ``test_c2s.py``).
"""

from __future__ import annotations

import pytest

from tests.conftest import ProxyStarter
from tests.proxy.test_c2s import mechanism_authenticates
from tests.support.ejabberd import EjabberdServer

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256"])
async def test_sasl_mechanisms_authenticate_through_the_proxy(
    ejabberd: EjabberdServer, proxy_for: ProxyStarter, mechanism: str
) -> None:
    """ejabberd keeps the password, so every SCRAM works on its one configuration."""
    users = ejabberd.register_fresh("dave", "erin")
    running = await proxy_for(ejabberd)
    await mechanism_authenticates(running, users["dave"], users["erin"], mechanism)
