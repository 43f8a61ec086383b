"""Lexicons: word and phrase lists that flag messages for review by a compliance officer.

Regulatory surveillance (FINRA 3110, MiFID II) reviews messages that mention, say,
"guaranteed return" or "off the record". A lexicon only ever FLAGs: the message is delivered
and queued for review, never held or refused, and contributes nothing to the score (so no
threshold can turn a lexicon hit into a block).

Matching is on words, case-insensitively: text and terms are NFKC-normalised, case-folded
and split into runs of letters and digits, and a term matches where its words appear
consecutively. So ``risk-free`` matches "Risk free", "RISK-FREE" and "risk/free", and
``guaranteed return`` does not match "unguaranteed returns". Lookup costs O(words in the
message), however many terms a lexicon has.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

from classifier.context import DecisionContext
from classifier.errors import RuleError
from classifier.rules import RuleResult
from classifier.verdict import Action

_WORD = re.compile(r"\w+")
MAX_TERM_WORDS = 16
MAX_REPORTED_TERMS = 3
# Bodies are cut here before matching: a megabyte body must not cost a megabyte of tokens
# per lexicon. Far beyond any chat message; a longer one is flagged on its first part only.
MAX_SCANNED_CHARS = 100_000


def words_of(text: str) -> tuple[str, ...]:
    """The comparison words of ``text``: NFKC, case-folded runs of letters and digits."""
    return tuple(_WORD.findall(unicodedata.normalize("NFKC", text).casefold()))


@dataclass(frozen=True, slots=True)
class Lexicon:
    """A named list of terms. Build with `Lexicon.of`.

    Attributes:
        name: Shown in reasons and in the rule id.
        terms: The terms as written, sorted, without duplicates.
    """

    name: str
    terms: tuple[str, ...]
    # first word -> (words, term as written), longest first so the longest match is reported
    _index: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = field(compare=False, repr=False)

    @classmethod
    def of(cls, name: str, terms: Iterable[str]) -> Lexicon:
        """Build a lexicon.

        Raises:
            RuleError: if a term has no letters or digits, or more than 16 words.
        """
        index: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        written = sorted(set(terms))
        for term in written:
            words = words_of(term)
            if not words:
                shown = repr(term) if len(term) <= 60 else repr(term[:57]) + "..."
                raise RuleError(f"term {shown} has no letters or digits to match")
            if len(words) > MAX_TERM_WORDS:
                raise RuleError(f"term {term[:60]!r}... has more than {MAX_TERM_WORDS} words")
            index.setdefault(words[0], []).append((words, term))
        frozen = {
            first: tuple(sorted(entries, key=lambda e: (-len(e[0]), e[1])))
            for first, entries in index.items()
        }
        return cls(name, tuple(written), frozen)

    def find(self, text: str, limit: int = MAX_REPORTED_TERMS) -> tuple[str, ...]:
        """The terms (as written) found in ``text``, in order of first appearance, at most
        ``limit`` of them."""
        words = words_of(text[:MAX_SCANNED_CHARS])
        found: dict[str, None] = {}
        for i, word in enumerate(words):
            for term_words, term in self._index.get(word, ()):
                if words[i : i + len(term_words)] == term_words:
                    found.setdefault(term, None)
                    if len(found) >= limit:
                        return tuple(found)
                    break  # the longest term starting here is enough
        return tuple(found)


class LexiconRule:
    """FLAGs a stanza whose body contains a term of its lexicon. Never blocks."""

    def __init__(self, lexicon: Lexicon, *, rule_id: str | None = None) -> None:
        self._lexicon = lexicon
        self._rule_id = rule_id or f"lexicon-{lexicon.name}"

    @property
    def rule_id(self) -> str:
        return self._rule_id

    @property
    def description(self) -> str:
        return f"flags messages that use a term of the lexicon {self._lexicon.name}"

    @property
    def lexicon(self) -> Lexicon:
        return self._lexicon

    def evaluate(self, ctx: DecisionContext) -> RuleResult | None:
        if not ctx.body:
            return None
        found = self._lexicon.find(ctx.body)
        if not found:
            return None
        terms = ", ".join(repr(t if len(t) <= 60 else t[:57] + "...") for t in found)
        # Always FLAG with no score: see the module docstring.
        return RuleResult(Action.FLAG, 0.0, f"lexicon {self._lexicon.name}: {terms}")
