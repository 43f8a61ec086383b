"""The composition root's exception tree."""

from __future__ import annotations


class StanzaGuardError(Exception):
    """Base of errors raised by the `stanzaguard` package."""


class SettingsError(StanzaGuardError):
    """The settings are invalid; the message names the bad key."""
