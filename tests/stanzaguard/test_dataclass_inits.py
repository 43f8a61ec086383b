"""Dataclasses with an ``__init__`` of their own (docs/native.md, "Own ``__init__``").

mypyc compiles a hand-written ``__init__`` to direct stores, where the one ``dataclasses``
generates stays interpreted (and, frozen, goes through ``object.__setattr__`` per field): the
records built for every stanza spell theirs out. This checks, from the source, that each one
still is exactly what ``dataclasses`` would generate: every field a parameter, in order, with
its default (a ``default_factory`` of ``tuple`` or ``frozenset`` as the empty value), each
stored under its own name, and ``__post_init__`` called last where the class has one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("stanzaguard", "proxy", "classifier", "archive_api")
EMPTY_OF_FACTORY = {"tuple": "()", "frozenset": "frozenset()"}


def own_init_dataclasses() -> Iterator[tuple[str, ast.ClassDef, ast.FunctionDef]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.ClassDef) or not any(
                    "dataclass" in ast.unparse(d) for d in node.decorator_list
                ):
                    continue
                for stmt in node.body:
                    if isinstance(stmt, ast.FunctionDef) and stmt.name == "__init__":
                        yield f"{path.relative_to(ROOT)}:{node.name}", node, stmt


CLASSES = list(own_init_dataclasses())


def expected_parameters(cls: ast.ClassDef) -> list[tuple[str, str, str | None]]:
    """(name, annotation, default) of each ``__init__`` field, as dataclasses reads them."""
    out: list[tuple[str, str, str | None]] = []
    for stmt in cls.body:
        if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
            continue
        annotation = ast.unparse(stmt.annotation)
        if annotation.startswith(("ClassVar", "InitVar")):
            continue
        default: str | None = None
        value = stmt.value
        if isinstance(value, ast.Call) and ast.unparse(value.func) == "field":
            options = {k.arg: k.value for k in value.keywords}
            assert "init" not in options, "a field left out of __init__ is not handled here"
            if "default" in options:
                default = ast.unparse(options["default"])
            elif "default_factory" in options:
                default = EMPTY_OF_FACTORY[ast.unparse(options["default_factory"])]
        elif value is not None:
            default = ast.unparse(value)
        out.append((stmt.target.id, annotation, default))
    return out


def test_the_records_of_every_stanza_have_their_own_init() -> None:
    names = {name.rpartition(":")[2] for name, _, _ in CLASSES}
    assert {"MessageEvent", "ArchiveRecord", "DecisionContext", "SpoolEntry"} <= names


@pytest.mark.parametrize(("name", "cls", "init"), CLASSES, ids=[c[0] for c in CLASSES])
def test_an_own_init_is_what_dataclasses_would_generate(
    name: str, cls: ast.ClassDef, init: ast.FunctionDef
) -> None:
    arguments = init.args
    assert not arguments.posonlyargs and not arguments.kwonlyargs, name
    assert arguments.vararg is None and arguments.kwarg is None, name
    parameters = arguments.args[1:]
    defaults: list[str | None] = [None] * (len(parameters) - len(arguments.defaults))
    defaults += [ast.unparse(d) for d in arguments.defaults]
    written = [
        (p.arg, ast.unparse(p.annotation) if p.annotation else "", d)
        for p, d in zip(parameters, defaults, strict=True)
    ]
    assert written == expected_parameters(cls), name

    frozen = any("frozen=True" in ast.unparse(d) for d in cls.decorator_list)
    stores = [
        ast.unparse(stmt)
        for stmt in init.body
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))
    ]
    fields = [field for field, _, _ in expected_parameters(cls)]
    expected = [
        f"object.__setattr__(self, '{field}', {field})" if frozen else f"self.{field} = {field}"
        for field in fields
    ]
    if any(isinstance(s, ast.FunctionDef) and s.name == "__post_init__" for s in cls.body):
        expected.append("self.__post_init__()")
    assert stores == expected, name
