"""Build hook: the per-stanza hot path compiled to C by mypyc (docs/native.md).

The project's metadata is in pyproject.toml; this file only adds the compiled modules, and only
when STANZAGUARD_COMPILE=1 (``make native`` sets it). Without it the package installs as pure
Python, which behaves the same and runs slower. The modules compiled are listed in
pyproject.toml under ``[tool.stanzaguard.native]``; STANZAGUARD_NATIVE_MODULES (comma-separated
module names) compiles those instead, e.g. one module for a quick check of the build.

Beside the compiled modules the build writes, per directory, ``native-sources.json``: the
SHA-256 of each compiled module's source. `stanzaguard.native` compares it with the source
beside the module to tell a current build from a stale one; file times cannot tell, since
installing a wheel writes the sources after the compiled modules.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
MANIFEST = "native-sources.json"


def native_modules() -> list[str]:
    chosen = os.environ.get("STANZAGUARD_NATIVE_MODULES", "").strip()
    if chosen:
        return [name.strip() for name in chosen.split(",") if name.strip()]
    with (ROOT / "pyproject.toml").open("rb") as file:
        config = tomllib.load(file)
    modules: list[str] = config["tool"]["stanzaguard"]["native"]["modules"]
    return modules


def source_digests(names: list[str]) -> dict[Path, dict[str, str]]:
    """Per package directory (relative), each compiled module's source SHA-256 by name."""
    manifests: dict[Path, dict[str, str]] = {}
    for name in names:
        relative = Path(*name.split("."))
        source = (ROOT / relative).with_suffix(".py")
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        manifests.setdefault(relative.parent, {})[relative.name] = digest
    return manifests


class BuildNative(build_ext):
    """build_ext that also records which sources the compiled modules were built from."""

    def run(self) -> None:
        super().run()
        if not self.extensions:
            return
        out = ROOT if self.inplace else Path(self.build_lib)
        for directory, digests in source_digests(native_modules()).items():
            text = json.dumps(digests, indent=1, sort_keys=True) + "\n"
            (out / directory / MANIFEST).write_text(text, encoding="utf-8")


def extensions() -> list[Extension]:
    if os.environ.get("STANZAGUARD_COMPILE") != "1":
        return []
    from mypyc.build import mypycify

    paths = [module.replace(".", "/") + ".py" for module in native_modules()]
    # One shared library for all of them (calls between compiled modules stay native), named
    # so that it is recognisable beside the packages.
    built: list[Extension] = mypycify(paths, opt_level="3", group_name="stanzaguard.native")
    return built


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildNative})
