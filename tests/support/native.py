"""The modules pyproject.toml lists for mypyc compilation ([tool.stanzaguard.native])."""

from __future__ import annotations

import ast
import functools
import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def native_module_names() -> list[str]:
    with PYPROJECT.open("rb") as file:
        names: list[str] = tomllib.load(file)["tool"]["stanzaguard"]["native"]["modules"]
    return names


@functools.cache
def interpreted(name: str) -> ModuleType:
    """A copy of module ``name`` run from its source, also where the module is compiled.

    For tests that replace one of a module's functions: compiled code calls the functions of
    its own module (and of the other compiled ones) directly, so a monkeypatched module
    attribute does not reach those calls. The copy is a separate module
    (``<name>__interpreted``): its classes are not the compiled module's classes.
    """
    source = PYPROJECT.parent / (name.replace(".", "/") + ".py")
    spec = importlib.util.spec_from_file_location(f"{name}__interpreted", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def module_docstring(name: str) -> str:
    """The docstring of module ``name`` as written in its source (compiled modules lack it)."""
    source = PYPROJECT.parent / (name.replace(".", "/") + ".py")
    return ast.get_docstring(ast.parse(source.read_text())) or ""
