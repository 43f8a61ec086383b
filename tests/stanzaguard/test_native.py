"""stanzaguard.native: which modules run compiled, and which compiled ones are out of date."""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
import types
from pathlib import Path

import pytest

from stanzaguard.native import native_status
from tests.support.native import interpreted, native_module_names

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An imported package ``sgfake`` whose directory the test fills with files."""
    module = types.ModuleType("sgfake")
    module.__path__ = [str(tmp_path)]
    monkeypatch.setitem(sys.modules, "sgfake", module)
    return tmp_path


def test_a_source_alone_is_not_compiled(package: Path) -> None:
    (package / "hot.py").write_text("")
    assert native_status(["sgfake.hot"]) == native_status([])


def test_a_compiled_module_newer_than_its_source_is_current(package: Path) -> None:
    (package / "hot.py").write_text("")
    (package / f"hot{SUFFIX}").write_bytes(b"")
    os.utime(package / "hot.py", (1_000, 1_000))
    status = native_status(["sgfake.hot", "sgfake.cold"])
    assert (status.compiled, status.stale) == (("sgfake.hot",), ())


def test_a_source_edited_after_the_build_is_stale(package: Path) -> None:
    (package / "hot.py").write_text("")
    (package / f"hot{SUFFIX}").write_bytes(b"")
    os.utime(package / f"hot{SUFFIX}", (1_000, 1_000))
    status = native_status(["sgfake.hot"])
    assert (status.compiled, status.stale) == (("sgfake.hot",), ("sgfake.hot",))


def test_modules_of_unimported_packages_are_not_guessed() -> None:
    assert native_status(["sgnotimported.hot"]).compiled == ()


def test_what_is_compiled_is_what_runs() -> None:
    names = native_module_names()
    compiled = native_status(names).compiled
    if not compiled:
        pytest.skip("pure Python run (STANZAGUARD_PURE_PYTHON=1 or no `make native`)")
    for name in compiled:
        module = importlib.import_module(name)
        functions = [
            value
            for value in vars(module).values()
            if isinstance(value, types.FunctionType) and value.__module__ == name
        ]
        assert functions == [], f"{name} runs from source"


def test_the_interpreted_copy_runs_from_source() -> None:
    copy = interpreted("proxy.stream")
    assert isinstance(copy.stream_error, types.FunctionType)
    assert copy is not sys.modules["proxy.stream"]
