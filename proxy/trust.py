"""What the proxy learns about who knows whom, fed into the classifier's `TrustStore`.

Roster results and pushes cross the proxy on the server→client leg (`RosterEvent`); the
pipeline hands each one to its `RosterObserver`. `TrustRosterObserver` applies them to a
`TrustStore`: a result replaces the owner's roster, a push changes one item. The pipeline
itself notes correspondents (whom a local user writes to) and asks the store, for every
incoming stanza, whether the recipient knows the sender
(`DecisionContext.sender_in_recipient_roster`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from classifier.trust import RosterItem, Subscription, TrustStore
from proxy.stanza import RosterEntry, RosterEvent

log = logging.getLogger(__name__)

_SUBSCRIPTIONS = {s.value: s for s in Subscription}


def roster_item(entry: RosterEntry) -> RosterItem:
    """The classifier's view of one roster item the proxy saw."""
    return RosterItem(
        jid=entry.jid,
        subscription=_SUBSCRIPTIONS.get(entry.subscription, Subscription.NONE),
        ask=entry.ask,
    )


def adds_contact(entry: RosterEntry) -> bool:
    """Whether a pushed item shows the owner wants the contact: a subscription *to* the
    contact (``to``/``both``) or a pending request by the owner (``ask='subscribe'``).

    That is the recipient "adding the sender", which releases what was held from them.
    """
    return entry.subscription in ("to", "both") or entry.ask


class TrustRosterObserver:
    """A `proxy.pipeline.RosterObserver` that keeps a `TrustStore` up to date."""

    def __init__(self, store: TrustStore) -> None:
        self.store = store

    def roster_seen(self, owner: str, event: RosterEvent) -> None:
        try:
            if event.is_push:
                for entry in event.items:
                    self.store.update_roster(owner, roster_item(entry))
            else:
                self.store.set_roster(owner, [roster_item(entry) for entry in event.items])
        except Exception:
            # A store that fails must not cost the stream: trust then stays unknown (None),
            # which the rules treat as "not a stranger" unless configured otherwise.
            log.exception("trust store refused a roster update")


class RosterObservers:
    """Several roster observers, each told in turn; one that raises does not stop the rest."""

    def __init__(self, *observers: Callable[[str, RosterEvent], None]) -> None:
        self._observers = observers

    def roster_seen(self, owner: str, event: RosterEvent) -> None:
        for observer in self._observers:
            try:
                observer(owner, event)
            except Exception:
                log.exception("roster observer failed")
