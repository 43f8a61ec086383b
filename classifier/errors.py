"""The one exception tree of the classifier package.

Callers catch `ClassifierError` for anything this package raises on purpose. Both subclasses
are also `ValueError`s, because both mean "the input (a policy document, a rule's
configuration) is not acceptable", and code that already handles `ValueError` keeps working.
"""

from __future__ import annotations


class ClassifierError(Exception):
    """Base class of every error the classifier raises deliberately."""


class PolicyError(ClassifierError, ValueError):
    """A policy document is not valid.

    Attributes:
        key: Dotted path of the offending key (``"federation.mode"``,
            ``"federation.domains[3]"``), or ``None`` when the problem is the whole document.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class RuleError(ClassifierError, ValueError):
    """A rule or chain is misconfigured, or a rule cannot decide.

    Raised when a rule or `RuleChain` is built with bad parameters (an invalid domain pattern,
    duplicate rule ids). A rule may also raise it from ``evaluate``; the chain then applies its
    failure action like for any other exception.
    """
