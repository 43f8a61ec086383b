"""The slixmpp stanza classes `proxy.stanza` wraps presence and iq stanzas in.

Private subclasses with plugin maps of their own, started empty: slixmpp discovers plugins
eagerly (every registered child is wrapped when the stanza is), so what it or a running client
registers on the shared classes (slixmpp.stanza.roster puts RosterItem on Roster at import; a
plugin's init puts MUC items on MUCPresence) would otherwise add work there, and our
registrations would change what a running client sees.

They live apart from `proxy.stanza` because that module is compiled by mypyc (see
docs/native.md) and this one must not be: slixmpp links a plugin to its parent stanza by a
weak reference, and instances of a class that mypyc built from an interpreted base do not
support weak references correctly (the interpreter crashes reading the parent back).
"""

from __future__ import annotations

from slixmpp.features.feature_bind.stanza import Bind
from slixmpp.plugins.xep_0045.stanza import MUCJoin, MUCPresence
from slixmpp.plugins.xep_0172.stanza import UserNick
from slixmpp.plugins.xep_0191.stanza import Block, BlockItem
from slixmpp.plugins.xep_0359.stanza import StanzaID
from slixmpp.plugins.xep_0377.stanza import Report
from slixmpp.stanza import Iq, Presence
from slixmpp.stanza.roster import Roster
from slixmpp.xmlstream import register_stanza_plugin


class MucUserPresence(MUCPresence):
    pass


class PresenceStanza(Presence):
    pass


class ReportPayload(Report):
    pass


class BlockItemPayload(BlockItem):
    pass


class BlockPayload(Block):
    pass


class RosterPayload(Roster):
    pass


class IqStanza(Iq):
    pass


def _register_plugins() -> None:
    for cls in (
        MucUserPresence,
        PresenceStanza,
        ReportPayload,
        BlockItemPayload,
        BlockPayload,
        RosterPayload,
        IqStanza,
    ):
        cls.plugin_attrib_map = {}
        cls.plugin_tag_map = {}
        cls.plugin_iterables = set()
        cls.plugin_overrides = {}
    register_stanza_plugin(PresenceStanza, MUCJoin)
    register_stanza_plugin(PresenceStanza, MucUserPresence)
    register_stanza_plugin(PresenceStanza, UserNick)
    register_stanza_plugin(ReportPayload, StanzaID, iterable=True)
    register_stanza_plugin(BlockItemPayload, ReportPayload)
    register_stanza_plugin(BlockPayload, BlockItemPayload, iterable=True)
    for payload in (Bind, RosterPayload, BlockPayload):
        register_stanza_plugin(IqStanza, payload)


_register_plugins()
