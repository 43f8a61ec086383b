"""stanzaguard.native: which modules run compiled, and which compiled ones are out of date."""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path

import pytest

from stanzaguard.native import MANIFEST, native_status
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


def record(package: Path, **sources: bytes) -> None:
    """What a build writes beside the modules it compiled: each source's SHA-256."""
    digests = {name: hashlib.sha256(text).hexdigest() for name, text in sources.items()}
    (package / MANIFEST).write_text(json.dumps(digests))


def test_a_module_built_from_the_source_beside_it_is_current(package: Path) -> None:
    (package / "hot.py").write_bytes(b"x = 1\n")
    (package / f"hot{SUFFIX}").write_bytes(b"")
    record(package, hot=b"x = 1\n")
    # As after installing a wheel: the source written after the compiled module.
    os.utime(package / f"hot{SUFFIX}", (1_000, 1_000))
    status = native_status(["sgfake.hot", "sgfake.cold"])
    assert (status.compiled, status.stale) == (("sgfake.hot",), ())


def test_a_source_edited_after_the_build_is_stale(package: Path) -> None:
    (package / "hot.py").write_bytes(b"x = 2\n")
    (package / f"hot{SUFFIX}").write_bytes(b"")
    record(package, hot=b"x = 1\n")
    os.utime(package / "hot.py", (1_000, 1_000))  # however old the file looks
    status = native_status(["sgfake.hot"])
    assert (status.compiled, status.stale) == (("sgfake.hot",), ("sgfake.hot",))


@pytest.mark.parametrize("manifest", [None, b"", b"not json", b"[1, 2]", b'{"hot": 1}', b"{}"])
def test_a_build_without_a_usable_record_is_stale(package: Path, manifest: bytes | None) -> None:
    (package / "hot.py").write_bytes(b"x = 1\n")
    (package / f"hot{SUFFIX}").write_bytes(b"")
    if manifest is not None:
        (package / MANIFEST).write_bytes(manifest)
    assert native_status(["sgfake.hot"]).stale == ("sgfake.hot",)


def test_a_compiled_module_without_its_source_is_current(package: Path) -> None:
    (package / f"hot{SUFFIX}").write_bytes(b"")
    status = native_status(["sgfake.hot"])
    assert (status.compiled, status.stale) == (("sgfake.hot",), ())


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
