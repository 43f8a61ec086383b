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


NAMESPACES = {"": "jabber:client", "stream": "http://etherx.jabber.org/streams"}


@pytest.mark.parametrize(
    "data",
    [
        b"<message id='open'><body>no end",
        b"<message id='open'><sg:end xmlns:sg='urn:stanzaguard:parser'/>",
        b"",
        b"just text",
    ],
)
def test_what_is_not_one_whole_element_is_refused_and_spoils_nothing(data: bytes) -> None:
    with pytest.raises(FramingError) as caught:
        Element(data, "jabber:client", "message", {}, NAMESPACES).tree()
    assert caught.value.condition == "not-well-formed"
    (after,) = elements(b"<message id='after'><body>fine</body></message>")
    assert after.tree().get("id") == "after"


def test_a_tree_is_the_stanza_alone() -> None:
    # The sentinel fed after each stanza must not show up in it, beside it or after it.
    first, second = elements(
        b"<message id='1'><body>one</body></message>",
        b"<message id='2'><sg:end xmlns:sg='urn:stanzaguard:parser'/></message>",
    )
    tree = first.tree()
    assert [child.tag for child in tree] == ["{jabber:client}body"]
    assert tree.tail is None
    assert [child.tag for child in second.tree()] == ["{urn:stanzaguard:parser}end"]
    assert first.tree() is tree and tree.findtext("{jabber:client}body") == "one"
