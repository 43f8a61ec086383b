"""`Element.tree()`: one reusable parser per set of stream namespaces, and its failure modes."""

from __future__ import annotations

import pytest

from proxy.errors import FramingError
from proxy.stream import Element, Framer, FramingLimits

HEADER = (
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
    b"to='example.test' version='1.0'>"
)


def elements(*stanzas: bytes) -> list[Element]:
    framer = Framer(FramingLimits())
    framer.feed(HEADER)
    out: list[Element] = []
    for data in stanzas:
        out += [f for f in framer.feed(data) if isinstance(f, Element)]
    return out


def test_trees_are_the_stanzas_with_stream_namespaces_in_scope() -> None:
    first, second = elements(
        b"<message id='1'><body>one</body></message>",
        b"<message id='2'><body>two</body><x xmlns='urn:example'>y</x></message>",
    )
    assert first.tree().tag == "{jabber:client}message"
    assert first.tree().findtext("{jabber:client}body") == "one"
    assert second.tree().find("{urn:example}x") is not None
    assert second.tree().get("id") == "2"
    assert first.tree() is first.tree()  # parsed once


def test_an_undeclared_prefix_fails_that_stanza_only() -> None:
    bad, good = elements(
        b"<message><foo:bar/></message>", b"<message id='after'><body>fine</body></message>"
    )
    with pytest.raises(FramingError) as caught:
        bad.tree()
    assert caught.value.condition == "not-well-formed"
    # The shared parser was spoiled by the bad stanza; the next one gets a fresh parser.
    assert good.tree().get("id") == "after"


def test_many_stanzas_through_one_parser_stay_correct() -> None:
    stanzas = [f"<message id='m{i}'><body>{i}</body></message>".encode() for i in range(5000)]
    for i, element in enumerate(elements(*stanzas)):
        assert element.tree().findtext("{jabber:client}body") == str(i)
